"""service/lane.py: the inference routes' requests skip the framework's layers, and answer exactly as through them."""

from __future__ import annotations

import orjson
import pytest
from fastapi.testclient import TestClient
from svc_helpers import image_bytes, settings_for, wait_ready

from service.app import create_app
from service.lane import MATCHED_PATHS, InferenceLane

KEY = "lane-test-key"


@pytest.fixture(scope="module")
def app_and_client(model_repo):
    app = create_app(settings_for(model_repo, default_model="ppca-digits", api_key=KEY, max_body_bytes=4096,
                                  cors_origins=["https://example.org"]))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield app, c


def _requests(digits) -> list[tuple[str, str, dict]]:
    """(method, url, httpx keyword arguments): good and bad requests to inference routes."""
    png = image_bytes(digits.test[0].reshape(8, 8))
    key = {"X-API-Key": KEY}
    oip = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": digits.test[0].tolist()}]}
    x = digits.test[:1].astype("<f4").tobytes()
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(x)}}],
                         "parameters": {"binary_data_output": True}})
    binary = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream", **key}

    def streamed():  # no Content-Length: the body limit counts the chunks as they come
        yield from [b"x" * 1000] * 5

    return [
        ("POST", "/encode", {"files": [("images", ("d.png", png, "image/png"))], "headers": key}),
        ("POST", "/encode", {"files": [("images", ("d.png", png, "image/png"))]}),  # no key: 401
        ("POST", "/encode", {"content": b"x" * 5000, "headers": {**key, "Content-Type": "image/png"}}),  # 413
        ("POST", "/encode", {"content": b"{}", "headers": {**key, "Content-Type": "text/plain"}}),  # 415
        ("POST", "/encode?model=nope", {"json": {"images": [digits.test[0].tolist()]}, "headers": key}),  # 404
        ("GET", "/sample?n=0&format=json", {"headers": key}),  # 422
        ("POST", "/decode?format=json", {"json": {"z": [[0.0] * 5]}, "headers": key}),
        ("POST", "/decode", {"json": {"z": [[0.0] * 4]}, "headers": key}),  # wrong d: 422
        ("GET", "/sample?n=2&seed=1&format=json", {"headers": key}),
        ("POST", "/log-likelihood", {"json": {"images": [digits.test[0].tolist()]}, "headers": key}),
        ("POST", "/v2/models/ppca-digits.encoder/infer", {"content": orjson.dumps(oip), "headers": key}),
        ("POST", "/v2/models/ppca-digits.encoder/infer", {"content": orjson.dumps(oip)}),  # 401, OIP form
        ("POST", "/v2/models/nope.encoder/infer", {"content": orjson.dumps(oip), "headers": key}),  # 404
        ("POST", "/v2/models/ppca-digits.encoder/versions/1/infer", {"content": b"{", "headers": key}),  # 400
        ("POST", "/v2/models/ppca-digits.encoder/infer", {"content": b"[" * 5000, "headers": key}),  # 413
        ("POST", "/v2/models/ppca-digits.encoder/infer", {"content": head + x, "headers": binary}),  # binary
        ("POST", "/v2/models/ppca-digits.encoder/infer", {"content": head + x[:-4], "headers": binary}),  # 400
        ("POST", "/v2/models/ppca-digits.encoder/infer", {"content": streamed(), "headers": key}),  # 413, OIP form
        ("POST", "/encode", {"content": streamed(), "headers": {**key, "Content-Type": "application/json"}}),  # 413
    ]


def _answer(r) -> tuple:
    headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date")}
    return r.status_code, headers, r.content


def test_inference_requests_take_the_lane_and_others_the_full_stack(app_and_client, digits):
    app, client = app_and_client
    lane = app.middleware_stack
    assert isinstance(lane, InferenceLane)
    full, seen = lane.full, []

    async def counting_full(scope, receive, send):
        seen.append(scope["path"])
        await full(scope, receive, send)

    lane.full = counting_full
    try:
        for method, url, kwargs in _requests(digits):
            client.request(method, url, **kwargs)
        assert seen == []
        client.get("/health")
        client.get("/encode", headers={"X-API-Key": KEY})  # a method the route does not take: 405, full stack
        client.get("/v2/models/ppca-digits.encoder", headers={"X-API-Key": KEY})
        assert seen == ["/health", "/encode", "/v2/models/ppca-digits.encoder"]
    finally:
        lane.full = full


def test_every_answer_is_the_full_stacks(app_and_client, digits):
    """Status, headers and body of each request through the lane equal those through the framework's layers."""
    app, client = app_and_client
    lane = app.middleware_stack
    through_lane = [_answer(client.request(m, u, **kw)) for m, u, kw in _requests(digits)]
    app.middleware_stack = lane.full
    try:
        through_full = [_answer(client.request(m, u, **kw)) for m, u, kw in _requests(digits)]
    finally:
        app.middleware_stack = lane
    statuses = [a[0] for a in through_lane]
    assert statuses == [200, 401, 413, 415, 404, 422, 200, 422, 200, 200, 200, 401, 404, 400, 413, 200, 400, 413,
                        413], statuses
    assert through_lane[-2][1]["content-type"] == "application/json"  # the protocol's error form, not a 500
    assert orjson.loads(through_lane[-2][2])["error"].startswith("the request body is larger than the limit")
    assert through_lane[-4][1]["content-type"] == "application/octet-stream"
    for (method, url, _), a, b in zip(_requests(digits), through_lane, through_full, strict=True):
        assert a == b, (method, url)
    assert all("x-request-id" in client.request(m, u, **kw).headers for m, u, kw in _requests(digits)[:3])


def test_a_bug_in_a_handler_is_a_logged_500_problem(app_and_client, digits, monkeypatch):
    app, client = app_and_client
    route = next(r for r in app.router.routes if getattr(r, "path", None) == "/decode")

    async def broken(request):
        raise RuntimeError("a bug")

    monkeypatch.setattr(route, "endpoint", broken)
    r = client.post("/decode", json={"z": [[0.0] * 5]}, headers={"X-API-Key": KEY})
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/problem+json")
    assert "a bug" not in r.text


def test_cors_preflight_and_headers_on_the_lane(app_and_client):
    _, client = app_and_client
    r = client.options("/encode", headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.org"
    r = client.get("/sample?n=1&format=json", headers={"X-API-Key": KEY, "Origin": "https://example.org"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://example.org"


def test_opentelemetry_on_keeps_the_full_stack(model_repo):
    app = create_app(settings_for(model_repo, opentelemetry=True))
    assert not isinstance(app.build_middleware_stack(), InferenceLane)
    assert isinstance(create_app(settings_for(model_repo)).build_middleware_stack(), InferenceLane)


def test_infer_paths_matched_once_are_kept_in_a_bounded_table(app_and_client):
    app, client = app_and_client
    lane = app.middleware_stack
    for i in range(MATCHED_PATHS + 20):  # invented model names: each a 404, none kept for long
        r = client.post(f"/v2/models/nope{i}.encoder/infer", content=b"{}", headers={"X-API-Key": KEY})
        assert r.status_code == 404 and f"nope{i}.encoder" in r.json()["error"]
    assert len(lane._matched) <= MATCHED_PATHS
    r = client.post("/v2/models/ppca-digits.encoder/versions/1/infer", content=b"{", headers={"X-API-Key": KEY})
    assert r.status_code == 400  # matched (its version parameter too) after the table was emptied
    assert lane._matched[("", "/v2/models/ppca-digits.encoder/versions/1/infer")][1] == {
        "name": "ppca-digits.encoder", "version": "1"}
