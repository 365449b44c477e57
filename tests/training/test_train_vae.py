"""`python -m training fit --model vae|flow-vae` end to end on small data, and its error paths."""

import json

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
