"""The schemathesis CLI run from outside, as a client would: `st run URL/openapi.json --checks all` against a real
server, from the repository root so that schemathesis.toml and its hooks (tests/schemathesis_hooks.py) apply.

Every check counts (no 5xx, responses and statuses as documented, schema-valid requests accepted, schema-violating
ones refused): the OpenAPI schema says exactly what the service accepts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_schemathesis_cli_all_checks(live):
    st = Path(sys.executable).with_name("st")
    if not st.is_file():
        pytest.skip("the schemathesis CLI (st) is not installed next to this Python")
    # A bounded run (about 15 s on 2 cores): every phase, few examples per operation, one worker.
    cmd = [str(st), "run", f"{live.url}/openapi.json", "--checks", "all", "--max-examples", "25", "--workers", "1",
           "--continue-on-failure", "--no-color"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "schemathesis.toml" in out, "st did not read the project's schemathesis.toml:\n" + out[-3000:]
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out[-20000:]}"


def test_openapi_states_the_loaded_models_and_their_limits(live):
    """What the schema says is what the server does: `model` is one of the loaded models (an empty name is
    none of them), a JSON image body holds nothing but `images`, and the lengths and limits JSON Schema cannot
    state are given as data (x-latentserve) that match the server's answers."""
    import httpx

    spec = httpx.get(f"{live.url}/openapi.json").json()
    models = httpx.get(f"{live.url}/models").json()
    names = sorted(m["name"] for m in models["models"])
    param = next(p for p in spec["paths"]["/encode"]["post"]["parameters"] if p["name"] == "model")
    assert next(s for s in param["schema"]["anyOf"] if s.get("type") == "string")["enum"] == names
    ext = spec["x-latentserve"]
    assert ext["default_model"] == models["default_model"]
    keys = ("image_shape", "channels", "data_dim", "latent_dim")
    assert ext["models"] == {m["name"]: {k: m[k] for k in keys} for m in models["models"]}
    assert spec["components"]["schemas"]["ImagesJSON"]["additionalProperties"] is False

    r = httpx.get(f"{live.url}/sample", params={"model": "", "format": "json", "n": 1})
    assert r.status_code == 404 and r.json()["type"] == "/problems/unknown-model", r.text
    image = [[0.0] * 8 for _ in range(8)]
    assert httpx.post(f"{live.url}/encode", json={"images": [image]}).status_code == 200
    r = httpx.post(f"{live.url}/encode", json={"images": [image], "note": "x"})
    assert r.status_code == 422 and "note" in r.json()["detail"], r.text

    # The stated limits are the ones applied: one over each is refused, and at each it is not.
    d = ext["models"][ext["default_model"]]["latent_dim"]
    example = spec["components"]["schemas"]["DecodeRequest"]["examples"][0]
    assert len(example["z"][0]) == d and httpx.post(f"{live.url}/decode", json=example).status_code == 200
    work, vae = ext["limits"]["log_likelihood_work"], next(m["name"] for m in models["models"] if m["kind"] != "ppca")
    params = spec["paths"]["/log-likelihood"]["post"]["parameters"]
    max_samples = next(p for p in params if p["name"] == "samples")["schema"]["anyOf"][0]["maximum"]
    n = work // max_samples + 1  # enough images for the product to bind below the samples' own maximum
    images = {"images": [image] * n}
    for samples, status in ((work // n + 1, 413), (work // n, None)):
        r = httpx.post(f"{live.url}/log-likelihood", params={"model": vae, "samples": samples}, json=images,
                       timeout=60)
        assert r.status_code == status if status else r.status_code in (200, 429), r.text
