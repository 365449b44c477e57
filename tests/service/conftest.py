"""A small model repository fitted by the training code once per session, and an app serving it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import settings_for, wait_ready

from service.app import create_app

# name -> fit arguments (tiny models on scikit-learn's 8x8 digits; the whole fixture takes ~15 s)
FITS = {
    "ppca-digits": ["--model", "ppca", "--method", "closed-form", "--latent-dim", "5"],
    "vae-digits": ["--model", "vae", "--latent-dim", "4", "--hidden", "32", "--epochs", "2", "--eval-samples", "8",
                   "--likelihood", "bernoulli"],
    "flow-vae-digits": ["--model", "flow-vae", "--flows", "2", "--latent-dim", "4", "--hidden", "32", "--epochs",
                        "2", "--eval-samples", "8", "--likelihood", "bernoulli"],
}


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    """models/ with ppca-digits, vae-digits and flow-vae-digits (the VAEs when their driver exists)."""
    from training.cli import main

    repo = tmp_path_factory.mktemp("models")
    for name, args in FITS.items():
        try:
            rc = main(["fit", *args, "--dataset", "digits", "--out", str(repo / name), "--quiet", "--seed", "0"])
        except ImportError:  # the VAE driver is not there yet: serve what exists
            continue
        assert rc == 0, f"fitting {name} failed"
    assert (repo / "ppca-digits" / "card.json").is_file()
    return repo


@pytest.fixture(scope="session")
def client(model_repo) -> TestClient:
    app = create_app(settings_for(model_repo))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="session")
def digits():
    from training.data import load_dataset

    return load_dataset("digits", valid_fraction=0.1)


@pytest.fixture
def need(model_repo):
    """need(name) -> name, or skip when that model could not be fitted (its driver is missing)."""

    def _need(name: str) -> str:
        if not (model_repo / name / "card.json").is_file():
            pytest.skip(f"{name} was not fitted (its training driver is missing)")
        return name

    return _need


@pytest.fixture(scope="session")
def live(model_repo, tmp_path_factory):
    """`python -m service` on 127.0.0.1 serving the session's model repository, for real HTTP requests."""
    from svc_helpers import start_server

    server = start_server(model_repo, tmp_path_factory.mktemp("live") / "server.log",
                          default_model="ppca-digits")
    yield server
    server.stop()
