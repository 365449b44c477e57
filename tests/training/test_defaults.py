"""The default model set builder: builds missing models, skips valid ones, rebuilds broken ones."""

import pytest

from model_repository.card import load_model_card
from training import defaults
from training.config import DataOptions, FitJob
from training.train_ppca import PPCAFit


def _ppca(latent_dim: int) -> FitJob:
    return FitJob("ppca", PPCAFit(method="closed-form", latent_dim=latent_dim), DataOptions("digits"))


@pytest.fixture
def tiny_defaults(monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_MODELS", {"ppca-tiny": _ppca(3)})


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


# Fits in parallel processes (--jobs 2), their progress and a failed fit: tests/training/test_progress.py.
