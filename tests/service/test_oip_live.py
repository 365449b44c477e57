"""Real Open Inference Protocol clients against `python -m service` over HTTP: Triton's tritonclient.http
(binary tensors, its default, and JSON) and KServe's InferenceRESTClient, with an API key and a body limit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from svc_helpers import ROOT, start_server
from tritonclient.utils import InferenceServerException

KEY = "s3cret"
MAX_BODY = 16 * 1024  # small enough for one request to pass it
KSERVE_PYTHON = Path(os.environ.get("LATENTSERVE_KSERVE_PYTHON", ROOT / ".venv-kserve" / "bin" / "python"))


@pytest.fixture(scope="module")
def server(model_repo, tmp_path_factory):
    s = start_server(model_repo, tmp_path_factory.mktemp("oip") / "server.log", api_key=KEY,
                     max_body_bytes=str(MAX_BODY), default_model="ppca-digits")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tc(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


def _auth() -> dict:
    # A new dict each call: tritonclient's infer writes Inference-Header-Content-Length into the one it is given.
    return {"X-API-Key": KEY}


def _reference(model_repo: Path, graph: str, feeds: dict) -> dict:
    """ONNX Runtime on the graph file itself, one call, no service in between."""
    session = ort.InferenceSession(str(model_repo / graph))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _input(name: str, a: np.ndarray, binary: bool) -> triton.InferInput:
    i = triton.InferInput(name, list(a.shape), "FP32")
    i.set_data_from_numpy(a, binary_data=binary)
    return i


def test_tritonclient_health_metadata_index_and_api_key(tc, need):
    name = need("vae-digits") + ".encoder"
    assert tc.is_server_live() and tc.is_server_ready()  # the probes need no key
    assert tc.is_model_ready(name, headers=_auth())
    assert tc.is_model_ready(name, model_version="1", headers=_auth())
    assert not tc.is_model_ready(name, model_version="2", headers=_auth())
    assert tc.get_server_metadata(headers=_auth())["extensions"] == ["binary_tensor_data", "model_repository"]
    meta = tc.get_model_metadata(name, headers=_auth())
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    index = tc.get_model_repository_index(headers=_auth())
    assert {"name": name, "version": "1", "state": "READY"} in index
    with pytest.raises(InferenceServerException) as e:
        tc.get_model_metadata(name)
    assert e.value.status() == "401" and "API key" in e.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_equals_onnx_runtime(tc, need, model_repo, digits, binary):
    """Binary (tritonclient's default: binary inputs, binary outputs) and JSON both ways."""
    name = need("flow-vae-digits")
    x = digits.test[:5].astype(np.float32)
    outputs = None if binary else [triton.InferRequestedOutput(o, binary_data=False) for o in ("z_k", "mean")]
    res = tc.infer(f"{name}.encoder", [_input("x", x, binary)], outputs=outputs, request_id="t-1", headers=_auth(),
                   parameters={"note": "ignored"})
    got = res.get_response()
    assert got["id"] == "t-1" and got["model_name"] == f"{name}.encoder"
    assert [("parameters" in o, "data" in o) for o in got["outputs"]] == [(binary, not binary)] * len(got["outputs"])
    ref = _reference(model_repo, f"{name}/encoder.onnx", {"x": x})
    names = [o["name"] for o in got["outputs"]]
    assert names == (list(ref) if binary else ["z_k", "mean"])
    for n in names:
        np.testing.assert_allclose(res.as_numpy(n), ref[n], rtol=1e-5, atol=1e-6)


def test_tritonclient_decoder_and_errors(tc, need, model_repo):
    name = need("vae-digits")
    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    res = tc.infer(f"{name}.decoder", [_input("z", z, True)], headers=_auth())
    ref = _reference(model_repo, f"{name}/decoder.onnx", {"z": z})
    np.testing.assert_allclose(res.as_numpy("x_mean"), ref["x_mean"], rtol=1e-5, atol=1e-6)
    cases = [  # (model, input, status, words)
        ("nope.encoder", _input("x", np.zeros((1, 64), np.float32), True), "404", "no model 'nope.encoder'"),
        (f"{name}.encoder", _input("img", np.zeros((1, 64), np.float32), True), "400", "unexpected input 'img'"),
        (f"{name}.encoder", _input("x", np.zeros((1, 63), np.float32), False), "400", "shape [1, 63]"),
        (f"{name}.encoder", _input("x", np.zeros((64, 64), np.float32), True), "413", f"limit of {MAX_BODY}"),
    ]
    for model, inp, status, words in cases:
        with pytest.raises(InferenceServerException) as e:
            tc.infer(model, [inp], headers=_auth())
        assert e.value.status() == status and words in e.value.message(), (e.value.status(), e.value.message())


def test_kserve_rest_client(server, need, model_repo, digits):
    if not KSERVE_PYTHON.is_file():
        pytest.skip(f"no KServe venv at {KSERVE_PYTHON} (kserve pins protobuf < 7 and pandas < 3, so it has its own; "
                    "create it with `VENV=.venv-kserve scripts/setup-venv kserve`; scripts/test does in CI)")
    name = need("vae-digits") + ".encoder"
    x = digits.test[:3].astype(np.float32)
    proc = subprocess.run([str(KSERVE_PYTHON), str(Path(__file__).with_name("kserve_client_check.py")), server.url,
                           KEY, name], input=json.dumps(x.tolist()), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["live"] is True and out["ready"] is True and out["model_ready"] is True
    ref = _reference(model_repo, "vae-digits/encoder.onnx", {"x": x})
    for kind in ("json", "binary"):
        res = out[kind]
        assert res["id"] == f"kserve-{kind == 'binary'}" and res["model_name"] == name
        for n in ("mean", "log_var"):
            np.testing.assert_allclose(np.array(res["outputs"][n], np.float32), ref[n], rtol=1e-5, atol=1e-6)
    assert out["json"]["outputs"] == out["binary"]["outputs"]
    assert "no model 'nope.encoder'" in out["unknown_model_error"] and "404" in out["unknown_model_error"]
