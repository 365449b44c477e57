"""ONNX export of PPCA and the model repository's validation of what it writes."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_repository.card import ModelRepositoryError, load_model_card
from service.repository import discover_models
from training.cli import main
from training.common import load_checkpoint
from training.data import load_dataset
from training.export import ExportError, GraphSpec, check_parity, export_graph
from training.train_ppca import build_model


@pytest.fixture(scope="module")
def ppca_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ppca-digits"
    assert main(["fit", "--model", "ppca", "--method", "closed-form", "--dataset", "digits",
                 "--latent-dim", "6", "--out", str(out), "--quiet"]) == 0
    return out


def _run(path, **feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_card_and_graphs_follow_the_contract(ppca_dir):
    card = load_model_card(ppca_dir)
    assert (card.kind, card.image_shape, card.data_dim, card.latent_dim) == ("ppca", (8, 8), 64, 6)
    assert card.graphs == {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "loglik": "loglik.onnx"}
    assert card.metrics["log_likelihood_exact"] is True
    for role, names in {"encoder": ["mean", "log_var"], "decoder": ["x_mean"], "loglik": ["log_px"]}.items():
        sess = ort.InferenceSession(str(card.graph_path(role)))
        assert [o.name for o in sess.get_outputs()] == names
        assert sess.get_inputs()[0].shape[0] == "N"  # dynamic batch axis


def test_exported_graphs_reproduce_the_exact_model(ppca_dir):
    model = build_model(load_checkpoint(ppca_dir))
    x = load_dataset("digits").test
    log_px = _run(ppca_dir / "loglik.onnx", x=x.astype(np.float32))[0]
    ref = model.log_prob(torch.as_tensor(x)).detach().numpy()
    assert np.max(np.abs(log_px - ref) / np.abs(ref).clip(1)) < 1e-4
    card = load_model_card(ppca_dir)
    assert float(np.mean(ref)) == pytest.approx(card.metrics["test_log_likelihood"], abs=1e-6)
    mean, log_var = _run(ppca_dir / "encoder.onnx", x=x[:64].astype(np.float32))
    post_mean, post_cov = model.posterior(torch.as_tensor(x[:64]))
    assert np.abs(mean - post_mean.detach().numpy()).max() < 1e-4
    assert np.abs(log_var - np.log(np.diag(post_cov.detach().numpy()))).max() < 1e-4
    z = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    (x_mean,) = _run(ppca_dir / "decoder.onnx", z=z)
    ref_mean = (model.mu + torch.as_tensor(z, dtype=torch.float64) @ model.W.T).detach().numpy()
    assert np.abs(x_mean - ref_mean).max() < 1e-4


def test_parity_check_fails_an_export_that_differs(tmp_path):
    class Affine(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, z):
            return z * 2.0 + self.shift

    spec = GraphSpec(Affine(0.0), ["z"], ["x_mean"])
    export_graph(spec, tmp_path / "g.onnx", D=4, d=4)
    assert check_parity(spec, tmp_path / "g.onnx", D=4, d=4, real_x=None)["x_mean"] < 1e-6
    spec.module.shift = 1e-3  # torch now differs from the exported graph by more than 1e-4
    with pytest.raises(ExportError, match=r"differ on 'x_mean' by 0.001"):
        check_parity(spec, tmp_path / "g.onnx", D=4, d=4, real_x=None)


@pytest.mark.parametrize("fault", ["corrupt", "missing", "sha", "card-json", "kind"])
def test_broken_model_folders_are_detected(ppca_dir, tmp_path, fault):
    repo = tmp_path / "models"
    bad = repo / "bad"
    shutil.copytree(ppca_dir, bad)
    shutil.copytree(ppca_dir, repo / "good")
    for d in ("bad", "good"):
        card = json.loads((repo / d / "card.json").read_text())
        (repo / d / "card.json").write_text(json.dumps(dict(card, name=d)))
    card = json.loads((bad / "card.json").read_text())
    if fault == "corrupt":
        data = bytearray((bad / "decoder.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / "decoder.onnx").write_bytes(bytes(data))
        expected = r"decoder\.onnx: sha256 .* does not match"
    elif fault == "missing":
        (bad / "loglik.onnx").unlink()
        expected = r"loglik\.onnx: missing"
    elif fault == "sha":
        card["files"]["encoder.onnx"]["sha256"] = "0" * 64
        (bad / "card.json").write_text(json.dumps(card))
        expected = r"encoder\.onnx: sha256 .* does not match the card's 0000"
    elif fault == "card-json":
        (bad / "card.json").write_text("{not json")
        expected = "card.json: not valid JSON"
    else:
        card["kind"] = "gan"
        (bad / "card.json").write_text(json.dumps(card))
        expected = "kind 'gan' is unknown"
    with pytest.raises(ModelRepositoryError, match=expected):
        load_model_card(bad)
    valid, broken = discover_models(repo)
    assert list(valid) == ["good"] and list(broken) == ["bad"]
