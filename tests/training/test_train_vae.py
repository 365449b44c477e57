"""`python -m training fit --model vae|flow-vae` end to end on small data, and its error paths."""

import json
import time
from dataclasses import replace

import pytest
import torch

from training import train_vae
from training.cli import main
from training.common import load_checkpoint, read_json
from training.config import DataOptions, FitJob, RunOptions
from training.data import load_dataset

PNG = b"\x89PNG\r\n\x1a\n"


def test_flow_vae_fit_writes_checkpoint_metrics_plots_and_evaluate_reproduces_them(tmp_path, capsys):
    out = tmp_path / "flow-vae"
    assert main(["fit", "--model", "flow-vae", "--dataset", "digits", "--epochs", "2", "--no-export",
                 "--out", str(out), "--hidden", "32", "--flows", "3", "--eval-samples", "20", "--quiet"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["kind"] == "flow-vae"
    assert ckpt["config"]["flows"] == 3 and ckpt["config"]["likelihood"] == "gaussian"  # digits are not binary
    assert ckpt["meta"]["dataset"] == "digits" and ckpt["meta"]["image_shape"] == [8, 8]
    assert ckpt["meta"]["training"]["epochs_run"] == 2 and ckpt["meta"]["training"]["seconds"] > 0
    metrics = read_json(out / "metrics.json")
    for key in ("train_elbo", "valid_elbo", "test_elbo", "test_log_likelihood", "test_bits_per_dim", "seconds"):
        assert isinstance(metrics[key], float), key
    assert metrics["importance_samples"] == 20 and metrics["log_likelihood_exact"] is False
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"] - 1.0  # IW (S=20) vs ELBO (S=10) estimates
    for png in ("elbo.png", "samples.png", "reconstructions.png"):
        assert (out / png).read_bytes()[:8] == PNG
    capsys.readouterr()
    assert main(["evaluate", str(out), "--samples", "20"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"], abs=1e-6)
    assert figures["test_elbo"] == pytest.approx(metrics["test_elbo"], abs=1e-6)
    model = train_vae.build_model(ckpt)
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_vae_on_mnist5k_bin_binarizes_dynamically_and_reports_bits_per_dim(tmp_path):
    out = tmp_path / "vae"
    assert main(["fit", "--model", "vae", "--dataset", "mnist5k-bin", "--epochs", "1", "--no-export",
                 "--out", str(out), "--hidden", "16", "--latent-dim", "4", "--eval-samples", "5", "--quiet"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["meta"]["training"]["dynamic_binarization"] is True
    assert ckpt["config"]["likelihood"] == "bernoulli" and ckpt["config"]["flows"] == 0
    metrics = read_json(out / "metrics.json")
    ll = metrics["test_log_likelihood"]
    assert metrics["test_bits_per_dim"] == pytest.approx(-ll / (784 * 0.6931471805599453))
    assert metrics["dataset"]["n_train"] == 3600 and metrics["dataset"]["n_test"] == 1000


def _job(**kw) -> FitJob:
    settings = train_vae.VAEFit(**{"hidden": (16,), "flows": 2, "epochs": 2, "eval_samples": 5, **kw})
    return FitJob("flow-vae", settings, DataOptions("digits"), RunOptions(device="cpu", quiet=True))


def test_nan_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    original = train_vae.VAE.log_weight_terms

    def poisoned(self, x, eps):
        log_px_z, log_pz, log_q0, log_det = original(self, x, eps)
        return log_px_z * torch.nan, log_pz, log_q0, log_det

    monkeypatch.setattr(train_vae.VAE, "log_weight_terms", poisoned)
    data = load_dataset("digits")
    with pytest.raises(FloatingPointError, match=r"flow-vae training diverged in epoch 1: the training ELBO is nan"):
        train_vae.fit(_job(), data, tmp_path)


def test_flow_count_must_match_the_kind(tmp_path, capsys):
    assert main(["fit", "--model", "vae", "--flows", "3", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    assert "--model vae has no flows" in capsys.readouterr().err
    assert main(["fit", "--model", "flow-vae", "--flows", "0", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    assert "needs --flows >= 1" in capsys.readouterr().err
    data = load_dataset("digits")
    with pytest.raises(ValueError, match="needs continuous training intensities"):
        train_vae.fit(_job(dynamic_binarization=True, likelihood="bernoulli"), data, tmp_path)


@pytest.mark.parametrize("options", [
    ["--model", "flow-vae", "--flows", "2", "--objective", "iwae", "--k", "3", "--layer", "gated",
     "--lr-warmup-epochs", "1"],
    ["--model", "vae", "--layer", "residual", "--activation", "none", "--objective", "elbo", "--k", "2",
     "--warmup-epochs", "1", "--kl-schedule", "cosine", "--precision", "bf16"],
], ids=["flow-vae-iwae-gated", "vae-elbo-k2-residual-bf16"])
def test_fit_options_train_export_and_serve(tmp_path, options):
    """A fit with the recipe options writes their settings and the validation bound, its ONNX graphs pass the
    export's parity check, and the service serves them: /log-likelihood equals the torch model on the same eps."""
    import math

    import numpy as np
    from fastapi.testclient import TestClient

    from model_repository.card import load_model_card
    from service.app import create_app
    from service.settings import Settings
    from training.layers import GatedLinear, ResidualLinear

    out = tmp_path / "models" / "recipe"
    assert main(["fit", *options, "--dataset", "digits", "--epochs", "2", "--hidden", "16", "16", "--latent-dim",
                 "4", "--likelihood", "bernoulli", "--eval-samples", "8", "--out", str(out), "--quiet"]) == 0
    given = dict(zip(options[::2], options[1::2], strict=True))
    metrics = read_json(out / "metrics.json")
    assert isinstance(metrics["valid_log_likelihood"], float)
    assert metrics["valid_log_likelihood"] >= metrics["valid_elbo"] - 1.0  # IW (S=8) vs ELBO (S=10) estimates
    ckpt = load_checkpoint(out)
    training = ckpt["meta"]["training"]
    assert ckpt["config"]["layer"] == training["layer"] == given["--layer"]
    assert (training["objective"], training["k"]) == (given["--objective"], int(given["--k"]))
    recipe = train_vae.KIND_DEFAULTS[given["--model"]]  # the kind's own warm-ups where none is given
    assert training["lr_warmup_epochs"] == float(given.get("--lr-warmup-epochs", recipe["lr_warmup_epochs"]))
    assert training["warmup_epochs"] == float(given.get("--warmup-epochs", recipe["warmup_epochs"]))
    assert training["kl_schedule"] == given.get("--kl-schedule", "linear")
    assert training["precision"] == "bf16"  # given for the vae, the flow-vae's default
    valid_curve = "valid ELBO" if given["--objective"] == "elbo" else "valid IW bound (S=4)"
    assert len(ckpt["meta"]["history"][valid_curve]) == 2
    model = train_vae.build_model(ckpt)  # checkpoint round trip
    assert isinstance(model.encoder[1], GatedLinear if given["--layer"] == "gated" else ResidualLinear)
    assert load_model_card(out).latent_dim == 4

    S, seed = 20, 3
    x = (load_dataset("digits").test[:6] >= 0.5).astype(np.float32)
    eps = np.random.default_rng(seed).standard_normal((len(x), S, 4), dtype=np.float32)
    with torch.no_grad():
        log_w = model.log_weights(torch.as_tensor(x), torch.as_tensor(eps)).double().numpy()
    settings = Settings(models_dir=out.parent, log_level="warning", max_queue_delay_ms=1.0)
    with TestClient(create_app(settings)) as client:
        for _ in range(300):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        r = client.post(f"/log-likelihood?model=recipe&samples={S}&seed={seed}", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    iw = np.logaddexp.reduce(log_w, axis=1) - math.log(S)
    for i, res in enumerate(r.json()["results"]):
        assert res["elbo"] == pytest.approx(log_w[i].mean(), rel=1e-4)
        assert res["iw_bound"] == pytest.approx(iw[i], rel=1e-4)


def test_a_checkpoint_of_the_former_code_loads_as_plain_layers():
    """Checkpoints written before --layer have no `layer` in their config and flat `encoder.0.weight` keys."""
    from dataclasses import asdict

    from training.vae import VAE, VAEConfig

    torch.manual_seed(0)
    old = VAE(VAEConfig(data_dim=64, latent_dim=3, encoder_hidden=(8, 8), decoder_hidden=(8, 8), flows=2))
    config = {k: v for k, v in asdict(old.config).items() if k != "layer"}
    state = old.state_dict()
    assert "encoder.2.weight" in state and "decoder.4.bias" in state
    model = train_vae.build_model({"config": config, "state_dict": state})
    assert model.config.layer == "plain"
    x = torch.rand(5, 64)
    eps = torch.randn(5, 2, 3)
    torch.testing.assert_close(model.log_weights(x, eps), old.eval().log_weights(x, eps), rtol=0, atol=0)


def test_recipe_options_reject_bad_values(tmp_path, capsys):
    base = ["fit", "--model", "vae", "--dataset", "digits", "--out", str(tmp_path)]
    assert main([*base, "--k", "0"]) == 2
    assert "--k is the number of samples per training row and must be >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--lr-warmup-epochs", "-1"]) == 2
    assert "warm-up epochs must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--objective", "kl"])
    assert "invalid choice: 'kl'" in capsys.readouterr().err


def test_the_kl_warm_up_defaults_by_kind(tmp_path, monkeypatch):
    monkeypatch.setitem(train_vae.KIND_DEFAULTS["flow-vae"], "warmup_epochs", 7.0)
    data = load_dataset("digits")
    train_vae.fit(_job(epochs=1), data, tmp_path / "default")
    assert load_checkpoint(tmp_path / "default")["meta"]["training"]["warmup_epochs"] == 7.0
    train_vae.fit(_job(epochs=1, warmup_epochs=3.0), data, tmp_path / "given")
    assert load_checkpoint(tmp_path / "given")["meta"]["training"]["warmup_epochs"] == 3.0


def test_each_kind_takes_its_recipe_and_given_settings_win():
    fit = train_vae.VAEFit()
    assert train_vae.for_kind(fit, "flow-vae") == replace(fit, flows=20, layer="gated", epochs=370, precision="bf16",
                                                          warmup_epochs=150.0, lr_warmup_epochs=10.0, objective="iwae",
                                                          k=4)
    assert train_vae.for_kind(fit, "vae") == replace(fit, flows=0, layer="plain", epochs=420, warmup_epochs=100.0,
                                                     lr_warmup_epochs=0.0, precision="fp32", objective="iwae", k=4)
    given = train_vae.VAEFit(layer="residual", epochs=7, objective="elbo")
    resolved = train_vae.for_kind(given, "flow-vae")
    assert (resolved.layer, resolved.epochs, resolved.flows, resolved.objective, resolved.k) == (
        "residual", 7, 20, "elbo", 4)
