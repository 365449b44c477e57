"""ONNX export of the VAE and flow-VAE: graphs reproduce the torch model and `training evaluate`."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_repository.card import load_model_card
from training.cli import main
from training.common import load_checkpoint
from training.data import load_dataset
from training.flows import planar_flows
from training.train_vae import build_model


@pytest.fixture(scope="module", params=["vae", "flow-vae"])
def vae_dir(request, tmp_path_factory):
    """A small Bernoulli model fitted on mnist5k-bin and exported by `fit`."""
    out = tmp_path_factory.mktemp("runs") / request.param
    args = ["fit", "--model", request.param, "--dataset", "mnist5k-bin", "--latent-dim", "8", "--hidden", "64",
            "--epochs", "2", "--eval-samples", "20", "--out", str(out), "--quiet"]
    if request.param == "flow-vae":
        args += ["--flows", "3"]
    assert main(args) == 0
    return out


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_card_follows_the_contract(vae_dir):
    card = load_model_card(vae_dir)
    assert card.likelihood == "bernoulli" and card.latent_dim == 8 and card.data_dim == 784
    assert card.flows == (3 if card.kind == "flow-vae" else 0)
    assert set(card.graphs) == {"encoder", "decoder", "bound"}
    outputs = [o.name for o in _session(card.graph_path("encoder")).get_outputs()]
    assert outputs == ["mean", "log_var"] + (["flow_u", "flow_w", "flow_b", "z_k"] if card.flows else [])
    assert [o.name for o in _session(card.graph_path("decoder")).get_outputs()] == ["x_mean", "logits"]
    bound = _session(card.graph_path("bound"))
    assert [i.shape for i in bound.get_inputs()] == [["N", 784], ["N", "S", 8]]
    assert card.metrics["importance_samples"] == 20 and card.metrics["log_likelihood_exact"] is False


def test_graphs_reproduce_the_torch_model(vae_dir):
    model = build_model(load_checkpoint(vae_dir))
    x = load_dataset("mnist5k-bin").test[:50].astype(np.float32)
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((50, 7, 8)).astype(np.float32)
    (log_w,) = _session(vae_dir / "bound.onnx").run(None, {"x": x, "eps": eps})
    with torch.no_grad():
        ref = model.log_weights(torch.from_numpy(x), torch.from_numpy(eps)).numpy()
    assert np.max(np.abs(log_w - ref) / np.abs(ref).clip(1)) < 1e-4
    enc = _session(vae_dir / "encoder.onnx").run(None, {"x": x})
    with torch.no_grad():
        mean, log_var, params = model.encode(torch.from_numpy(x))
    assert np.abs(enc[0] - mean.numpy()).max() < 1e-4 and np.abs(enc[1] - log_var.numpy()).max() < 1e-4
    if params is not None:
        # Anyone can recompute the flow from the exported parameters: w^T u_hat >= -1 holds for each.
        u, w, b, z_k = enc[2:]
        assert (np.einsum("nkd,nkd->nk", u, w) >= -1 - 1e-6).all()
        z0 = torch.from_numpy(enc[0])  # [N, d] with per-row parameters [N, K, d]
        zK_onnx, _ = planar_flows(z0, torch.from_numpy(u), torch.from_numpy(w), torch.from_numpy(b))
        with torch.no_grad():
            zK_torch, _ = model.flow(mean.unsqueeze(1), params)
        assert torch.allclose(zK_onnx, zK_torch[:, 0], atol=1e-4)
        # the graph's own z_k output is the same flow of the mean
        assert np.abs(z_k - zK_torch[:, 0].numpy()).max() < 1e-4


def test_bound_graph_reproduces_evaluate(vae_dir, capsys):
    S = 50
    capsys.readouterr()
    assert main(["evaluate", str(vae_dir), "--samples", str(S)]) == 0
    figures = json.loads(capsys.readouterr().out)
    x = load_dataset("mnist5k-bin").test.astype(np.float32)
    eps = np.random.default_rng(0).standard_normal((len(x), S, 8)).astype(np.float32)
    (log_w,) = _session(vae_dir / "bound.onnx").run(None, {"x": x, "eps": eps})
    elbo = float(log_w.mean())
    iw = float(np.mean(np.logaddexp.reduce(log_w.astype(np.float64), axis=1) - np.log(S)))
    # Independent noise on both sides: they agree within Monte Carlo error over 1,000 test rows.
    assert elbo == pytest.approx(figures["test_elbo"], abs=1.0)
    assert iw == pytest.approx(figures["test_log_likelihood"], abs=1.0)
    assert iw >= elbo
