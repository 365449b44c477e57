"""The Open Inference Protocol under /v2, in process: metadata, errors in the protocol's form, parity with the
native endpoints, the shared micro-batcher. Real clients over real HTTP: tests/service/test_oip_live.py."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from svc_helpers import run_async, settings_for

ROLES = {"ppca-digits": ["encoder", "decoder", "loglik"], "vae-digits": ["encoder", "decoder", "bound"],
         "flow-vae-digits": ["encoder", "decoder", "bound"]}


def _infer_body(name: str, x: np.ndarray, **extra) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "data": x.ravel().tolist()}], **extra})


def _oip_error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"  # exactly: KServe's client compares the whole value
    error = r.json()["error"]
    assert isinstance(error, str)
    for w in words:
        assert w in error, (w, error)
    return error


def test_server_metadata_health_and_versions(client, need):
    assert client.get("/v2").json() == {"name": "latentserve", "version": "0.1.0",
                                        "extensions": ["binary_tensor_data", "model_repository"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    name = need("vae-digits") + ".encoder"
    for path in (f"/v2/models/{name}", f"/v2/models/{name}/versions/1"):
        assert client.get(path).json()["versions"] == ["1"]
        assert client.get(path + "/ready").json() == {"name": name, "ready": True}
    _oip_error(client.get(f"/v2/models/{name}/versions/2"), 404, "version 1")
    _oip_error(client.get(f"/v2/models/{name}/versions/2/ready"), 404, "version 1")
    _oip_error(client.post(f"/v2/models/{name}/versions/2/infer", content=b"{}"), 404, "version 1")
    _oip_error(client.get("/v2/models/nope.encoder/ready"), 404, "nope.encoder")


def test_every_graph_is_a_model_with_its_real_signature(client, model_repo):
    """Metadata against ONNX Runtime's own reading of each graph file."""
    for folder, roles in ROLES.items():
        if not (model_repo / folder / "card.json").is_file():
            continue
        for role in roles:
            meta = client.get(f"/v2/models/{folder}.{role}").json()
            session = ort.InferenceSession(str(model_repo / folder / f"{role}.onnx"))

            def sig(args):
                return [{"name": a.name, "datatype": "FP32",
                         "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]

            assert meta == {"name": f"{folder}.{role}", "versions": ["1"], "platform": "onnx_onnxv1",
                            "inputs": sig(session.get_inputs()), "outputs": sig(session.get_outputs())}
            assert meta["inputs"][0]["shape"][0] == -1


def test_repository_index_lists_ready_graphs_and_broken_folders(model_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(model_repo / "ppca-digits", repo / "ppca-digits")
    shutil.copytree(model_repo / "ppca-digits", repo / "broken")
    card = json.loads((repo / "broken" / "card.json").read_text())
    (repo / "broken" / "card.json").write_text(json.dumps({**card, "name": "broken", "latent_dim": 0}))

    async def go(c, app):
        return [(await c.post("/v2/repository/index", content=body)).json() for body in (b"", b'{"ready": true}')]

    every, ready = run_async(settings_for(repo), go)
    ppca = [{"name": f"ppca-digits.{r}", "version": "1", "state": "READY"} for r in ROLES["ppca-digits"]]
    assert ready == ppca
    assert every[:-1] == ppca
    assert every[-1]["name"] == "broken" and every[-1]["state"] == "UNAVAILABLE"
    assert "latent_dim" in every[-1]["reason"] and str(tmp_path) not in every[-1]["reason"]


def test_subset_of_outputs_id_echo_nested_data_and_unknown_parameters(client, need, digits):
    name = need("flow-vae-digits")
    x = digits.test[:3].astype(np.float32)
    full = client.post(f"/v2/models/{name}.encoder/infer", content=_infer_body("x", x)).json()
    assert [o["name"] for o in full["outputs"]] == ["mean", "log_var", "flow_u", "flow_w", "flow_b", "z_k"]
    assert "id" not in full and full["model_name"] == f"{name}.encoder" and full["model_version"] == "1"
    body = {"id": "req-42", "parameters": {"priority": 3, "custom": {"nested": [1, 2]}},
            "inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "data": x.tolist(),
                        "parameters": {"whatever": True}}],
            "outputs": [{"name": "z_k"}, {"name": "mean", "parameters": {"note": "x"}}]}
    r = client.post(f"/v2/models/{name}.encoder/infer", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == "req-42"
    assert [o["name"] for o in got["outputs"]] == ["z_k", "mean"]
    by_name = {o["name"]: o for o in full["outputs"]}
    for o in got["outputs"]:
        assert o == by_name[o["name"]]
        assert o["shape"] == [3, 4] and o["datatype"] == "FP32"


def test_binary_in_and_out_equal_json(client, need, digits):
    name = need("vae-digits") + ".encoder"
    x = digits.test[:2].astype(np.float32)
    as_json = client.post(f"/v2/models/{name}/infer", content=_infer_body("x", x)).json()
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "log_var", "parameters": {"binary_data": True}}, {"name": "mean"}]})
    r = client.post(f"/v2/models/{name}/infer", content=head + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    log_var, mean = meta["outputs"]
    assert log_var["parameters"] == {"binary_data_size": 2 * 4 * 4} and "data" not in log_var
    assert len(r.content) == n + 32
    want = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in as_json["outputs"]}
    np.testing.assert_array_equal(np.frombuffer(r.content[n:], "<f4").reshape(2, 4), want["log_var"])
    np.testing.assert_array_equal(np.array(mean["data"], np.float32).reshape(2, 4), want["mean"])
    # binary_data_output: every output binary when none is named
    r = client.post(f"/v2/models/{name}/infer", content=_infer_body("x", x, parameters={"binary_data_output": True}))
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    assert [o["parameters"]["binary_data_size"] for o in json.loads(r.content[:n])["outputs"]] == [32, 32]


def _native_pixels(client, name: str, x: np.ndarray) -> dict:
    r = client.post(f"/encode?model={name}", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    return r.json()


def test_parity_with_native_encode_and_decode(client, need, digits):
    for folder in ("ppca-digits", "vae-digits"):
        name = need(folder)
        x = digits.test[5:9].astype(np.float32)  # intensities in [0, 1]: /encode keeps them as they are
        native = _native_pixels(client, name, x.reshape(-1, 8, 8))
        oip = {o["name"]: o["data"] for o in client.post(f"/v2/models/{name}.encoder/infer",
                                                           content=_infer_body("x", x)).json()["outputs"]}
        assert oip["mean"] == [v for r in native["results"] for v in r["mean"]]
        assert oip["log_var"] == [v for r in native["results"] for v in r["log_var"]]
        d = len(native["results"][0]["mean"])
        z = np.random.default_rng(3).standard_normal((3, d)).astype(np.float32)
        dec = client.post(f"/decode?model={name}", json={"z": z.tolist()}).json()
        out = client.post(f"/v2/models/{name}.decoder/infer", content=_infer_body("z", z)).json()["outputs"]
        x_mean = np.array(next(o for o in out if o["name"] == "x_mean")["data"], np.float32).reshape(3, 8, 8)
        np.testing.assert_array_equal(np.clip(x_mean, 0, 1), np.array(dec["images"], np.float32))


def test_bound_and_loglik_graphs(client, need, digits):
    """The log-likelihood graphs over OIP: ppca's exact log p(x) equals /log-likelihood's."""
    x = digits.test[:2].astype(np.float32)
    ppca = need("ppca-digits")
    out = client.post(f"/v2/models/{ppca}.loglik/infer", content=_infer_body("x", x)).json()["outputs"]
    native = client.post(f"/log-likelihood?model={ppca}", json={"images": x.reshape(-1, 8, 8).tolist()}).json()
    assert out[0]["name"] == "log_px"
    np.testing.assert_allclose(out[0]["data"], [r["log_likelihood"] for r in native["results"]], rtol=1e-6)
    vae = need("vae-digits")
    eps = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()},
                                    {"name": "eps", "shape": [2, 3, 4], "datatype": "FP32", "data": eps.tolist()}]})
    r = client.post(f"/v2/models/{vae}.bound/infer", content=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [2, 3]


X1 = {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
X1_JSON = orjson.dumps({"inputs": [X1]})
ERRORS = [  # (path suffix, body or JSON, headers, status, words the error must hold)
    ("nope.encoder", {"inputs": [X1]}, {}, 404, ["nope.encoder", "folder.graph"]),
    ("ppca-digits.encode", {"inputs": [X1]}, {}, 404, ["ppca-digits.encoder"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "name": "img"}]}, {}, 400, ["'img'", "x [-1, 64] FP32"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "shape": [1, 63]}]}, {}, 400, ["[1, 63]", "[-1, 64]"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "shape": [64]}]}, {}, 400, ["[64]", "[-1, 64]"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "shape": [2, 64]}]}, {}, 400, ["64 values", "needs 128"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "datatype": "FP64"}]}, {}, 400, ["'FP64'", "expects FP32"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "data": ["a"] * 64}]}, {}, 400, ["numbers only"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "data": [2.0] * 64}]}, {}, 400, ["[0, 1]", "max 2"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "data": [[0.5] * 64, [0.5]]}]}, {}, 400, ["'x'"]),
    ("ppca-digits.encoder", {"inputs": [X1], "outputs": [{"name": "z"}]}, {}, 400, ["unknown output 'z'", "mean"]),
    ("ppca-digits.encoder", {"inputs": []}, {}, 400, ["non-empty list"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "name": ["x"]}]}, {}, 400, ["unexpected input"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "shape": [0, 64], "data": []}]}, {}, 400, ["at least 1"]),
    ("ppca-digits.encoder", {"inputs": [X1], "outputs": [{"name": ["mean"]}]}, {}, 400, ["unknown output"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "data": [[[[0.5] * 64]]]}]}, {}, 400, ["holds 64 values"]),
    ("ppca-digits.encoder", {"inputs": [X1], "id": 5}, {}, 400, ["'id' must be a string"]),
    ("ppca-digits.encoder", b'{"inputs": [', {}, 400, ["not valid JSON"]),
    ("ppca-digits.encoder", b"", {}, 400, ["empty"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "shape": [65, 64], "data": [0.5] * 64 * 65}]}, {}, 413,
     ["65 rows", "1 to 64"]),
    ("ppca-digits.decoder", {"inputs": [{"name": "z", "shape": [1, 5], "datatype": "FP32", "data": [1e9] * 5}]}, {},
     400, ["|v| <= 1000"]),
    # binary sizes that do not add up
    ("ppca-digits.encoder", {"inputs": [{**X1, "data": None, "parameters": {"binary_data_size": 256}}]}, {}, 400,
     ["runs past"]),
    ("ppca-digits.encoder", {"inputs": [{**X1, "data": None, "parameters": {"binary_data_size": 255}}]}, {}, 400,
     ["needs 256 bytes"]),
    ("ppca-digits.encoder", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400, ["999"]),
    ("ppca-digits.encoder", X1_JSON + b"\0" * 8, {"Inference-Header-Content-Length": str(len(X1_JSON))}, 400,
     ["add up to 0 bytes", "8 bytes follow"]),
    ("ppca-digits.encoder", b"\x1f\x8b junk", {"Content-Encoding": "gzip"}, 400, ["not valid gzip"]),
    ("ppca-digits.encoder", b"{}", {"Content-Encoding": "br"}, 415, ["'br'"]),
]


@pytest.mark.parametrize(("suffix", "body", "headers", "status", "words"), ERRORS)
def test_errors_in_the_protocols_form(client, need, suffix, body, headers, status, words):
    need("ppca-digits")
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = client.post(f"/v2/models/{suffix}/infer", content=content, headers=headers)
    error = _oip_error(r, status, *words)
    assert r.json()["detail"] == error  # the problem's members stay beside it


def test_gzip_request_and_framework_errors(client, need, digits):
    import gzip

    need("ppca-digits")
    x = digits.test[:1].astype(np.float32)
    r = client.post("/v2/models/ppca-digits.encoder/infer", content=gzip.compress(_infer_body("x", x)),
                    headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 5]
    _oip_error(client.get("/v2/models/ppca-digits.encoder/infer"), 405, "GET is not allowed")
    _oip_error(client.get("/v2/models/ppca-digits.encoder/stats"), 404, "no endpoint")
    assert client.get("/models/nope").headers["content-type"] == "application/problem+json"  # native stays


def test_oip_and_native_requests_merge_into_one_call_bit_identical(model_repo, need, digits):
    """Concurrent OIP and native requests to one graph are merged by the one batcher, and each result equals
    the unbatched one bit for bit."""
    name = need("vae-digits")
    xs = [digits.test[i:i + 1 + i % 2].astype(np.float32) for i in range(16)]

    async def go(c, app):
        runner = app.state.runtime.models[name].runners["encoder"]
        calls = []
        run_items = runner._run_items

        def spy(items):
            calls.append([it.post.__name__ for it in items])
            return run_items(items)

        runner._run_items = spy

        async def one(i, x):
            if i % 2:
                r = await c.post(f"/v2/models/{name}.encoder/infer", content=_infer_body("x", x))
                return r.json()["outputs"][0]["data"]
            r = await c.post(f"/encode?model={name}", json={"images": x.reshape(-1, 8, 8).tolist()})
            return [v for res in r.json()["results"] for v in res["mean"]]

        return await asyncio.gather(*(one(i, x) for i, x in enumerate(xs))), calls

    batched, calls = run_async(settings_for(model_repo, max_queue_delay_ms=50.0), go)
    unbatched, _ = run_async(settings_for(model_repo, batching=False), go)
    assert batched == unbatched
    assert any({"pick", "post"} <= set(c) for c in calls), calls  # an OIP item and a native one in one call


def test_busy_answers_429_in_the_protocols_form_with_retry_after(model_repo):
    settings = settings_for(model_repo, batching=True, max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0,
                            inference_workers=1)
    body = orjson.dumps({"inputs": [X1]})

    async def go(c, app):
        return await asyncio.gather(*(c.post("/v2/models/ppca-digits.encoder/infer", content=body)
                                      for _ in range(30)))

    rs = run_async(settings, go)
    assert {r.status_code for r in rs} == {200, 429}
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    _oip_error(busy, 429, "retry")
