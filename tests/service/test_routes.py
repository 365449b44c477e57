"""The endpoints' normal use, through the real app."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import image_bytes, settings_for, wait_ready

from service.app import create_app

RNG = np.random.default_rng(0)


def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and "ppca-digits" in ready["models"]
    listing = client.get("/models").json()
    names = [m["name"] for m in listing["models"]]
    assert "ppca-digits" in names
    assert listing["default_model"] in names
    assert sum(m["default"] for m in listing["models"]) == 1
    detail = client.get("/models/ppca-digits").json()
    assert detail["kind"] == "ppca" and detail["card"]["graphs"]["loglik"] == "loglik.onnx"


def test_default_model_order(client, need):
    # no LATENTSERVE_DEFAULT_MODEL and no *-mnist model: the first loaded by name
    assert client.get("/models").json()["default_model"] == sorted(
        m["name"] for m in client.get("/models").json()["models"])[0]


def test_encode_png_jpeg_and_json_agree(client, digits):
    x = digits.test[:3].reshape(-1, 8, 8)
    files = [("images", (f"d{i}.png", image_bytes(x[i]), "image/png")) for i in range(3)]
    r = client.post("/encode?model=ppca-digits", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "ppca-digits" and len(body["results"]) == 3
    assert [res["source"] for res in body["results"]] == ["d0.png", "d1.png", "d2.png"]
    q = np.round(x * 255) / 255  # what an 8-bit PNG holds
    rj = client.post("/encode?model=ppca-digits", json={"images": [q[i].tolist() for i in range(3)]}).json()
    for a, b in zip(body["results"], rj["results"], strict=True):
        np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-6)
        assert len(a["mean"]) == 5 and len(a["log_var"]) == 5 and not a["resized"]
    # flat arrays work too
    rf = client.post("/encode?model=ppca-digits", json={"images": [q[0].ravel().tolist()]}).json()
    np.testing.assert_allclose(rf["results"][0]["mean"], rj["results"][0]["mean"], atol=1e-7)
    # JPEG (lossy): close to the PNG's code
    rjpg = client.post("/encode?model=ppca-digits",
                       files=[("images", ("d.jpg", image_bytes(x[0], fmt="JPEG", quality=100), "image/jpeg"))])
    assert rjpg.status_code == 200
    np.testing.assert_allclose(rjpg.json()["results"][0]["mean"], body["results"][0]["mean"], atol=0.1)


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("RGB", "BMP"),
                                      ("L", "TIFF"), ("RGB", "WEBP"), ("1", "PNG")])
def test_encode_converts_modes_and_formats(client, digits, mode, fmt):
    x = digits.test[0].reshape(8, 8)
    save = {"lossless": True} if fmt == "WEBP" else {}
    r = client.post("/encode?model=ppca-digits", files=[("images", ("img", image_bytes(x, mode, fmt, **save), "x"))])
    assert r.status_code == 200, r.text
    if mode in ("RGB", "RGBA", "LA", "P") and fmt != "GIF":
        ref = client.post("/encode?model=ppca-digits", files=[("images", ("a.png", image_bytes(x), "image/png"))])
        np.testing.assert_allclose(r.json()["results"][0]["mean"], ref.json()["results"][0]["mean"], atol=0.02)


def test_alpha_composited_on_white_and_invert(client):
    # dark ink drawn on a transparent background, as a canvas gives it: white background after compositing
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 3:5] = (0, 0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    ink = np.zeros((8, 8))
    ink[2:6, 3:5] = 1.0
    a = client.post("/encode?model=ppca-digits&invert=true", files=[("images", ("a.png", buf.getvalue(), "image/png"))])
    b = client.post("/encode?model=ppca-digits", json={"images": [ink.tolist()]})
    assert a.json()["inverted"] is True
    np.testing.assert_allclose(a.json()["results"][0]["mean"], b.json()["results"][0]["mean"], atol=1e-6)


def test_other_sizes_are_resized_and_said_so(client):
    big = np.zeros((28, 20))
    big[5:23, 8:12] = 1.0
    r = client.post("/encode?model=ppca-digits", files=[("images", ("big.png", image_bytes(big), "image/png"))])
    res = r.json()["results"][0]
    assert r.status_code == 200 and res["resized"] is True and res["original_shape"] == [28, 20]
    rj = client.post("/encode?model=ppca-digits", json={"images": [big.tolist()]}).json()["results"][0]
    assert rj["resized"] is True
    np.testing.assert_allclose(rj["mean"], res["mean"], atol=0.05)


def test_flow_model_returns_zk_and_params(client, need):
    name = need("flow-vae-digits")
    x = RNG.random((2, 64)).tolist()
    r = client.post(f"/encode?model={name}&flow_params=true", json={"images": x}).json()
    res = r["results"][0]
    assert len(res["z_k"]) == 4 and len(res["flow"]["u"]) == 2 and len(res["flow"]["b"]) == 2
    # z_K = f_K(...f_1(mean)) per models/README.md
    z = np.array(res["mean"], np.float32)
    for k in range(2):
        u, w, b = (np.array(res["flow"]["u"][k], np.float32), np.array(res["flow"]["w"][k], np.float32),
                   np.float32(res["flow"]["b"][k]))
        z = z + u * np.tanh(w @ z + b)
    np.testing.assert_allclose(res["z_k"], z, atol=1e-6)
    plain = client.post(f"/encode?model={name}", json={"images": x}).json()["results"][0]
    assert plain["flow"] is None and plain["z_k"] == res["z_k"]


def test_decode_json_png_and_accept(client):
    z = [[0.0] * 5, [1.0, -1.0, 0.5, 0.0, 2.0]]
    r = client.post("/decode?model=ppca-digits", json={"z": z})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    imgs = np.array(r.json()["images"])
    assert imgs.shape == (2, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1
    one = client.post("/decode?model=ppca-digits&format=png", json={"z": z[:1]})
    assert one.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(one.content)).size == (8, 8)
    grid = client.post("/decode?model=ppca-digits", json={"z": z}, headers={"Accept": "image/png"})
    assert grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size == (2 * 9 + 1, 9 + 1)  # 2 columns with 1-px separators
    scaled = client.post("/decode?model=ppca-digits&format=png&scale=4", json={"z": z[:1]})
    assert Image.open(io.BytesIO(scaled.content)).size == (32, 32)
    # the PNG holds the JSON image rounded to 8 bits
    png = np.asarray(Image.open(io.BytesIO(one.content)), np.float64) / 255
    np.testing.assert_allclose(png, imgs[0], atol=0.5 / 255 + 1e-6)


def test_sample_png_default_json_seed_temperature(client):
    r = client.get("/sample?model=ppca-digits&n=5&seed=3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # 3 x 2 grid of 8x8 digits with 1-pixel separators, upscaled 4 times by default for a browser.
    assert Image.open(io.BytesIO(r.content)).size == (4 * (3 * 9 + 1), 4 * (2 * 9 + 1))
    a = client.get("/sample?model=ppca-digits&n=5&seed=3&format=json").json()
    b = client.get("/sample?model=ppca-digits&n=5&seed=3", headers={"Accept": "application/json"}).json()
    assert a == b and a["seed"] == 3 and len(a["images"]) == 5
    z = np.array(a["z"])
    np.testing.assert_allclose(z, np.random.default_rng(3).standard_normal((5, 5)).astype(np.float32), atol=0)
    cold = client.get("/sample?model=ppca-digits&n=5&seed=3&temperature=0&format=json").json()
    assert np.all(np.array(cold["z"]) == 0)
    rnd = client.get("/sample?model=ppca-digits&n=2&format=json").json()
    assert isinstance(rnd["seed"], int)


def test_log_likelihood_ppca_exact(client, digits):
    r = client.post("/log-likelihood?model=ppca-digits", json={"images": digits.test[:4].tolist()}).json()
    assert r["samples"] is None and r["binarized"] is False
    for res in r["results"]:
        assert res["log_likelihood_exact"] is True
        assert res["elbo"] == res["iw_bound"] == res["log_likelihood"]
        D = 64
        assert res["bits_per_dim"] == pytest.approx((-res["log_likelihood"] + D * np.log(256)) / (D * np.log(2)))


def test_log_likelihood_vae_binarizes_and_is_reproducible(client, need, digits):
    name = need("vae-digits")
    x = digits.test[:3].tolist()
    a = client.post(f"/log-likelihood?model={name}&samples=20&seed=5", json={"images": x}).json()
    b = client.post(f"/log-likelihood?model={name}&samples=20&seed=5", json={"images": x}).json()
    assert a == b
    assert a["binarized"] is True and "0.5" in a["binarization"] and a["samples"] == 20
    binary = (np.array(x) >= 0.5).astype(float).tolist()
    c = client.post(f"/log-likelihood?model={name}&samples=20&seed=5", json={"images": binary}).json()
    assert [r["iw_bound"] for r in c["results"]] == [r["iw_bound"] for r in a["results"]]
    for res in a["results"]:
        assert res["elbo"] <= res["iw_bound"] + 1e-9 and res["log_likelihood_exact"] is False
        assert res["bits_per_dim"] == pytest.approx(-res["iw_bound"] / (64 * np.log(2)))
    raw = client.post(f"/log-likelihood?model={name}&samples=20&seed=5&binarize=false", json={"images": x}).json()
    assert raw["binarized"] is False and raw["results"][0]["bits_per_dim"] is None


def test_request_id_metrics_and_openapi(client):
    r = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/health").headers["x-request-id"]) == 32
    client.post("/encode?model=ppca-digits", json={"images": [[0.0] * 64]})
    text = client.get("/metrics").text
    for metric in ("latentserve_requests_total", "latentserve_request_duration_seconds_bucket",
                   "latentserve_batch_size_bucket", "latentserve_queue_time_seconds_bucket",
                   "latentserve_errors_total"):
        assert metric in text, metric
    assert 'endpoint="/encode",model="ppca-digits"' in text
    schema = client.get("/openapi.json").json()
    enc = schema["paths"]["/encode"]["post"]
    assert set(enc["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert "application/problem+json" in enc["responses"]["422"]["content"]
    assert "examples" in schema["components"]["schemas"]["EncodeResponse"]
    assert "image/png" in schema["paths"]["/sample"]["get"]["responses"]["200"]["content"]


def test_openapi_declares_the_query_parameters_the_handlers_read(client):
    """The inference handlers validate their query themselves (read_query); OpenAPI must still list it."""
    paths = client.get("/openapi.json").json()["paths"]
    expected = {("/encode", "post"): {"model", "invert", "flow_params"},
                ("/decode", "post"): {"model", "format", "scale"},
                ("/sample", "get"): {"model", "n", "seed", "temperature", "format", "scale"},
                ("/log-likelihood", "post"): {"model", "invert", "samples", "seed", "binarize"}}
    for (path, method), names in expected.items():
        params = {p["name"]: p for p in paths[path][method]["parameters"]}
        assert set(params) == names, path
        assert all(p["in"] == "query" and not p["required"] and p["description"] for p in params.values())
    body = paths["/decode"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/DecodeRequest"}
    assert "z" in client.get("/openapi.json").json()["components"]["schemas"]["DecodeRequest"]["properties"]
    n = {p["name"]: p for p in paths["/sample"]["get"]["parameters"]}["n"]["schema"]
    assert (n["type"], n["minimum"], n["default"]) == ("integer", 1, 16)
    fmt = {p["name"]: p for p in paths["/decode"]["post"]["parameters"]}["format"]["schema"]
    assert {"enum": ["json", "png"], "type": "string"} in fmt["anyOf"]


def test_access_log_is_one_json_line(client, caplog):
    import json
    import logging

    logger = logging.getLogger("service.access")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    try:
        client.post("/encode?model=ppca-digits", json={"images": [[0.0] * 64, [1.0] * 64]},
                    headers={"X-Request-ID": "log-test"})
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old)
    records = {id(r): r for r in caplog.records if "log-test" in r.getMessage()}  # caplog may see a record twice
    lines = [json.loads(r.getMessage()) for r in records.values()]
    assert len(lines) == 1
    line = lines[0]
    assert line["endpoint"] == "/encode" and line["model"] == "ppca-digits" and line["status"] == 200
    assert line["batch_size"] == 2 and line["latency_ms"] > 0


def test_a_request_route_handler_takes_the_request_and_its_query_alone():
    """RequestRoute calls its handler without FastAPI's parameter solving: any other parameter would be lost."""
    from service.endpoint import RequestRoute
    from service.schemas import SampleQuery

    async def takes_more(request, q, n: int = 1):  # pragma: no cover - never called
        return None

    with pytest.raises(TypeError, match=r"takes \(request, query\), got \['request', 'q', 'n'\]"):
        RequestRoute("/x", takes_more, query=SampleQuery, methods=["GET"])


def test_query_strings_are_read_as_starlette_reads_them(client):
    """Percent-encoding is decoded, and a repeated parameter keeps its last value (Starlette's rule)."""
    r = client.get("/sample?model=ppca%2Ddigits&n=2&n=3&format=json&seed=1")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "ppca-digits" and len(r.json()["images"]) == 3


def test_encoder_without_zk_output_gets_it_from_the_flow_parameters(model_repo, need, tmp_path):
    """Flow encoders exported before z_k was a graph output: the service computes z_k from flow_u, flow_w, flow_b
    (service/postprocess.py), and it agrees with what the graph itself gives."""
    import json
    import shutil

    import onnx

    from model_repository.card import sha256_file

    name = need("flow-vae-digits")
    old = tmp_path / "models" / name
    shutil.copytree(model_repo / name, old)
    graph = onnx.load(old / "encoder.onnx")
    kept = [o for o in graph.graph.output if o.name != "z_k"]
    assert len(kept) == len(graph.graph.output) - 1, "the exporter writes z_k"
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, old / "encoder.onnx")
    card = json.loads((old / "card.json").read_text())
    card["files"]["encoder.onnx"]["sha256"] = sha256_file(old / "encoder.onnx")
    (old / "card.json").write_text(json.dumps(card))
    x = RNG.random((3, 64)).tolist()
    with TestClient(create_app(settings_for(tmp_path / "models"))) as c:
        wait_ready(c)
        computed = c.post(f"/encode?model={name}", json={"images": x}).json()["results"]
    with TestClient(create_app(settings_for(model_repo))) as c:
        wait_ready(c)
        from_graph = c.post(f"/encode?model={name}", json={"images": x}).json()["results"]
    for a, b in zip(computed, from_graph, strict=True):
        assert a["mean"] == b["mean"]
        np.testing.assert_allclose(a["z_k"], b["z_k"], atol=1e-6)
