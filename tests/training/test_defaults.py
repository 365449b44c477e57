"""The default model set builder: builds missing models, skips valid ones, rebuilds broken ones."""

import pytest

from service.repository import load_model_card
from training import defaults


@pytest.fixture
def tiny_defaults(monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_MODELS", {
        "ppca-tiny": ["--model", "ppca", "--method", "closed-form", "--dataset", "digits", "--latent-dim", "3"],
    })


def test_build_skip_and_rebuild(tmp_path, tiny_defaults):
    models, runs = tmp_path / "models", tmp_path / "runs"
    assert defaults.build_defaults(models, runs_dir=runs, progress=False) == {"ppca-tiny": "built"}
    card = load_model_card(models / "ppca-tiny")
    assert card.name == "ppca-tiny" and card.latent_dim == 3
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # the staging folder was moved into place
    assert defaults.build_defaults(models, runs_dir=runs, progress=False) == {"ppca-tiny": "present"}
    (models / "ppca-tiny" / "decoder.onnx").write_bytes(b"corrupt")
    assert defaults.build_defaults(models, runs_dir=runs, progress=False) == {"ppca-tiny": "built"}
    load_model_card(models / "ppca-tiny")


def test_unknown_default_name(tmp_path, tiny_defaults):
    with pytest.raises(ValueError, match="unknown default model 'gan'"):
        defaults.build_defaults(tmp_path, names=["gan"])


def test_parallel_build_in_subprocesses(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_MODELS", {
        "ppca-a": ["--model", "ppca", "--method", "closed-form", "--dataset", "digits", "--latent-dim", "2"],
        "ppca-b": ["--model", "ppca", "--method", "closed-form", "--dataset", "digits", "--latent-dim", "3"],
    })
    status = defaults.build_defaults(tmp_path / "models", runs_dir=tmp_path / "runs", progress=False, jobs=2)
    assert status == {"ppca-a": "built", "ppca-b": "built"}
    assert load_model_card(tmp_path / "models" / "ppca-b").latent_dim == 3
