"""Model lifecycle over real HTTP against `python -m service` polling its repository (service/registry.py).

One server (polling every 0.2 s, an API key, two required models) starts on an empty repository; the folders are
written as the training code writes them (staged, then renamed into place: training/staging.py). Every answer
of /encode is checked against ONNX Runtime run directly on the encoder graph of the version it claims.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from svc_helpers import start_server

from training.staging import copy_model_dir, staged

KEY = {"X-API-Key": "k3y"}
NAME = "ppca-digits"
POLL_S = 0.2


@pytest.fixture(scope="module")
def versions(model_repo, tmp_path_factory) -> dict[int, Path]:
    """Two versions of ppca-digits, by latent size: the session's (5) and a closed-form fit with 3."""
    from training.cli import main

    out = tmp_path_factory.mktemp("v3") / NAME
    assert main(["fit", "--model", "ppca", "--method", "closed-form", "--latent-dim", "3", "--dataset", "digits",
                 "--out", str(out), "--quiet"]) == 0
    return {5: model_repo / NAME, 3: out}


def _reference(folder: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["mean"], {"x": x[None]})[0][0]


def _wait(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _latent_dim(url: str, name: str = NAME) -> int | None:
    models = httpx.get(f"{url}/models", headers=KEY, timeout=10).json()["models"]
    return next((m["latent_dim"] for m in models if m["name"] == name), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("lifecycle") / "models"
    repo.mkdir()
    srv = start_server(repo, tmp_path_factory.mktemp("lifecycle-log") / "server.log", ready=False,
                       repository_poll_seconds=POLL_S, api_key=KEY["X-API-Key"],
                       required_models="ppca-digits,vae-digits")
    srv.repo = repo
    yield srv
    srv.stop()


def test_a_served_folder_is_swapped_under_load_without_a_failed_or_mixed_answer(server, versions, model_repo):
    url, repo = server.url, server.repo
    r = httpx.get(f"{url}/ready", timeout=10)
    assert r.status_code == 503 and "no models" in r.json()["detail"]

    copy_model_dir(versions[5], repo / NAME)
    _wait(lambda: _latent_dim(url) == 5, "the first version to be served")
    # Served, but not ready: vae-digits is required too.
    r = httpx.get(f"{url}/ready", timeout=10)
    assert r.status_code == 503 and r.json()["detail"] == "required models not loaded yet: vae-digits"
    copy_model_dir(model_repo / "vae-digits", repo / "vae-digits")
    _wait(lambda: httpx.get(f"{url}/ready", timeout=10).status_code == 200, "/ready once vae-digits is served")

    x = np.random.default_rng(0).random(64, dtype=np.float32)
    refs = {d: _reference(versions[d], x) for d in versions}
    answers: list[tuple[int, np.ndarray]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=url, headers=KEY, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/encode", params={"model": NAME}, json={"images": [x.tolist()]})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                answers.append((len(r.json()["results"][0]["mean"]), np.asarray(r.json()["results"][0]["mean"],
                                                                                  np.float32)))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for d in (3, 5, 3, 5, 3, 5):
            copy_model_dir(versions[d], repo / NAME)  # staged, then swapped into place
            _wait(lambda d=d: _latent_dim(url) == d, f"version {d} to be served")
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    seen = {d for d, _ in answers}
    assert seen == {3, 5}, seen
    for d, mean in answers:  # each answer is wholly one version's
        np.testing.assert_allclose(mean, refs[d], rtol=1e-5, atol=1e-5)
    assert server.log().count(f"model {NAME} reloaded") >= 6


def test_a_broken_new_version_leaves_the_old_one_serving(server, versions):
    url, repo = server.url, server.repo
    _wait(lambda: _latent_dim(url) is not None, "a served version")
    served = _latent_dim(url)
    with staged(repo / NAME) as out:  # a new version whose decoder does not match its card's checksum
        for f in versions[3].iterdir():
            shutil.copy2(f, out / f.name)
        (out / "decoder.onnx").write_bytes((out / "decoder.onnx").read_bytes()[:-1] + b"\0")
    body = _wait(lambda: (b := httpx.get(f"{url}/models", headers=KEY, timeout=10).json())["unavailable"].get(NAME)
                 and b, "the failure to show in /models")
    reason = body["unavailable"][NAME]
    assert "sha256" in reason and "decoder.onnx" in reason and "goes on serving" in reason, reason
    assert "/tmp" not in reason  # no server path
    assert any(m["name"] == NAME and m["latent_dim"] == served for m in body["models"])
    r = httpx.post(f"{url}/encode", params={"model": NAME}, headers=KEY, json={"images": [[0.5] * 64]}, timeout=10)
    assert r.status_code == 200 and len(r.json()["results"][0]["mean"]) == served
    assert f"not reloading model folder {repo / NAME}" in server.log()
    # A good version replaces it, and the failure is gone.
    copy_model_dir(versions[5 if served == 3 else 3], repo / NAME)
    _wait(lambda: _latent_dim(url) == (5 if served == 3 else 3), "the good version")
    assert NAME not in httpx.get(f"{url}/models", headers=KEY, timeout=10).json()["unavailable"]


def test_explicit_unload_and_load_and_a_removed_folder(server, versions, model_repo):
    url, repo = server.url, server.repo
    _wait(lambda: _latent_dim(url) is not None, "a served version")
    assert "/models/{name}/load" in httpx.get(f"{url}/openapi.json", headers=KEY, timeout=10).json()["paths"]
    assert httpx.post(f"{url}/models/{NAME}/unload", timeout=10).status_code == 401  # the API key
    r = httpx.post(f"{url}/models/{NAME}/unload", headers=KEY, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "UNLOADED", r.text
    time.sleep(5 * POLL_S)  # the polls leave it unloaded
    r = httpx.post(f"{url}/encode", params={"model": NAME}, headers=KEY, json={"images": [[0.5] * 64]}, timeout=10)
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert httpx.post(f"{url}/models/{NAME}/unload", headers=KEY, timeout=10).status_code == 404
    r = httpx.post(f"{url}/models/{NAME}/load", headers=KEY, timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "READY", r.text
    r = httpx.post(f"{url}/encode", params={"model": NAME}, headers=KEY, json={"images": [[0.5] * 64]}, timeout=10)
    assert r.status_code == 200
    # The same through the Open Inference Protocol's repository extension (a graph's name acts on its folder).
    r = httpx.post(f"{url}/v2/repository/models/{NAME}.encoder/unload", headers=KEY, timeout=10)
    assert r.status_code == 200 and r.json() == {}, r.text
    assert httpx.get(f"{url}/v2/models/{NAME}.encoder/ready", headers=KEY, timeout=10).status_code == 404
    index = httpx.post(f"{url}/v2/repository/index", headers=KEY, timeout=10).json()
    assert {"name": NAME, "version": "", "state": "UNAVAILABLE", "reason": "unloaded on request"} in index
    r = httpx.post(f"{url}/v2/repository/models/{NAME}/load", headers=KEY, timeout=30)
    assert r.status_code == 200 and r.json() == {}, r.text
    assert httpx.get(f"{url}/v2/models/{NAME}.encoder/ready", headers=KEY, timeout=10).json()["ready"] is True
    r = httpx.post(f"{url}/v2/repository/models/{NAME}/load", headers=KEY, json={"parameters": {"config": "{}"}},
                   timeout=10)
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    r = httpx.post(f"{url}/models/no-such-model/load", headers=KEY, timeout=10)
    assert r.status_code == 404 and "no folder 'no-such-model'" in r.json()["detail"]
    # A folder that fails: 409 with the reason.
    (repo / "half").mkdir()
    (repo / "half" / "encoder.onnx").write_bytes(b"not yet")
    r = httpx.post(f"{url}/models/half/load", headers=KEY, timeout=10)
    assert r.status_code == 409 and "card.json: missing" in r.json()["detail"], r.text
    shutil.rmtree(repo / "half")
    # A removed folder is unloaded (at the second poll that misses it), and /ready says what is missing.
    shutil.rmtree(repo / "vae-digits")
    _wait(lambda: _latent_dim(url, "vae-digits") is None, "vae-digits to be unloaded")
    r = httpx.get(f"{url}/ready", timeout=10)
    assert r.status_code == 503 and "vae-digits" in r.json()["detail"]
    r = httpx.get(f"{url}/v2/health/ready", timeout=10)
    assert r.status_code == 503 and r.json()["error"] == "required models not loaded yet: vae-digits"
    assert "model vae-digits unloaded: its folder was removed" in server.log()
    copy_model_dir(model_repo / "vae-digits", repo / "vae-digits")
    _wait(lambda: httpx.get(f"{url}/ready", timeout=10).status_code == 200, "/ready again")


def test_model_control_is_off_without_an_api_key(live):
    for action in ("load", "unload"):
        r = httpx.post(f"{live.url}/models/ppca-digits/{action}", timeout=10)
        assert r.status_code == 403 and "LATENTSERVE_API_KEY" in r.json()["detail"], r.text
        r = httpx.post(f"{live.url}/v2/repository/models/ppca-digits/{action}", timeout=10)
        assert r.status_code == 403 and "LATENTSERVE_API_KEY" in r.json()["error"], r.text
    assert httpx.post(f"{live.url}/encode", json={"images": [[0.5] * 64]}, timeout=10).status_code == 200
    paths = httpx.get(f"{live.url}/openapi.json", timeout=10).json()["paths"]
    assert "/models/{name}" in paths and not any(p.endswith(("/load", "/unload")) for p in paths)
