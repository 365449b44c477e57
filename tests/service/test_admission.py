"""Issue 11, inference side: work counted as done (no padded images), one shared budget (429), cancellation
of queued chunks (a failed sibling, a client gone), capped response images, non-finite outputs answered 4xx.

Real HTTP (`live`, `start_server`) for what a client sees; GraphRunner and bound.evaluate directly where
only a deterministic setup can show the mechanism (a chunk dropped unrun).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from svc_helpers import run_async, settings_for, start_server

from service import bound
from service.admission import BusyError, WorkBudget
from service.batcher import GraphRunner, QueueFullError, session_options
from service.errors import problem_for
from service.metrics import Metrics
from service.postprocess import INLINE_VALUES, NonFiniteOutputError, Offload

# ------------------------------------------------------------------------------------------------
# The bound graph computes each image's own samples, not 8 padded images
# ------------------------------------------------------------------------------------------------


class CountingSession:
    """An ONNX Runtime session that records the shape of every `eps` it is given (optionally gated)."""

    def __init__(self, session, gate: threading.Event | None = None):
        self.session, self.gate, self.shapes, self.calls = session, gate, [], 0

    def run(self, names, feeds, *options):
        if self.gate is not None:
            self.gate.wait(30)
        self.calls += 1
        if "eps" in feeds:
            self.shapes.append(feeds["eps"].shape)
        return self.session.run(names, feeds, *options)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize(("images", "samples", "chunk_rows"), [(1, 1000, 2048), (3, 700, 300), (2, 5, 2048)])
def test_bound_computes_only_the_requests_samples(model_repo, need, digits, images, samples, chunk_rows):
    name = need("vae-digits")
    x = (digits.test[:images] >= 0.5).astype(float).tolist()

    async def go(c, app):
        runner = app.state.runtime.models[name].runners["bound"]
        runner.session = counting = CountingSession(runner.session)
        r = await c.post(f"/log-likelihood?model={name}&samples={samples}&seed=3", json={"images": x})
        return r, counting.shapes

    r, shapes = run_async(settings_for(model_repo, bound_chunk_rows=chunk_rows), go)
    assert r.status_code == 200, r.text
    p = bound.plan(images, samples, chunk_rows)
    assert all(s[0] == 1 and s[1] <= chunk_rows for s in shapes), shapes  # one row per call, no padded images
    computed = sum(s[0] * s[1] for s in shapes)
    assert computed == p.cost == images * p.slices * p.slice_len
    assert images * samples <= computed < images * (samples + p.slices)


def test_bound_results_match_an_unsplit_reference(model_repo, need, digits):
    """Slices and chunks change nothing but the last bits: the figures are those of eps [N, S, d] in one call."""
    name = need("flow-vae-digits")
    x = (digits.test[:3] >= 0.5).astype(np.float32)
    N, S, seed = 3, 23, 11

    async def go(c, app):
        return await c.post(f"/log-likelihood?model={name}&samples={S}&seed={seed}", json={"images": x.tolist()})

    r = run_async(settings_for(model_repo, bound_chunk_rows=7), go)  # k = 4 slices of 6 samples per image
    assert r.status_code == 200, r.text
    d = json.loads((model_repo / name / "card.json").read_text())["latent_dim"]
    eps = np.random.default_rng(seed).standard_normal((N, S, d), dtype=np.float32)
    session = ort.InferenceSession(str(model_repo / name / "bound.onnx"), providers=["CPUExecutionProvider"])
    lw = session.run(["log_w"], {"x": x, "eps": eps})[0].astype(np.float64)
    iw = np.log(np.exp(lw - lw.max(1, keepdims=True)).sum(1)) + lw.max(1) - np.log(S)
    got = r.json()["results"]
    np.testing.assert_allclose([g["elbo"] for g in got], lw.mean(1), rtol=1e-5)
    np.testing.assert_allclose([g["iw_bound"] for g in got], iw, rtol=1e-5)


def test_plan_bounds_each_call():
    for N, S, rows in [(1, 1, 1), (16, 5000, 2048), (64, 1250, 2048), (1, 1000, 2048), (5, 4097, 4096)]:
        p = bound.plan(N, S, rows)
        assert p.slice_len <= rows and p.slices * p.slice_len >= S > (p.slices - 1) * p.slice_len
        assert p.slices * p.slice_len - S < p.slices  # under one padded sample per slice
        assert p.images_per_chunk >= 1 and (p.images_per_chunk == 1 or p.images_per_chunk * S <= rows)


# ------------------------------------------------------------------------------------------------
# Cancellation: queued chunks are dropped unrun
# ------------------------------------------------------------------------------------------------


def test_runner_drops_a_cancelled_item_unrun(model_repo):
    settings = settings_for(model_repo, max_queue_delay_ms=0.0)
    gate = threading.Event()
    session = CountingSession(ort.InferenceSession(str(model_repo / "ppca-digits" / "encoder.onnx"),
                                                   session_options(settings)), gate)

    async def go():
        from concurrent.futures import ThreadPoolExecutor

        runner = GraphRunner("ppca-digits", "encoder", session, settings=settings, executor=ThreadPoolExecutor(1),
                             metrics=Metrics(), max_cost=1)
        runner.start(1)
        first = asyncio.create_task(runner.run({"x": np.zeros((1, 64), np.float32)}))
        await asyncio.sleep(0.05)  # the worker took it and waits at the gate
        second = asyncio.create_task(runner.run({"x": np.ones((1, 64), np.float32)}))
        await asyncio.sleep(0.05)
        second.cancel()
        gate.set()
        out = await first
        await asyncio.sleep(0.05)
        await runner.stop()
        return out, second

    out, second = asyncio.run(go())
    assert second.cancelled() and "mean" in out
    assert session.calls == 1  # the cancelled item never reached ONNX Runtime


def test_a_failed_chunk_cancels_its_queued_siblings():
    """bound.evaluate: when one chunk gets 429, the request fails with it and its other chunks are cancelled."""
    started, cancelled = [], []

    class Runner:
        async def run(self, feeds, cost=None, post=None):
            k = len(started)
            started.append(k)
            if k == 1:
                raise QueueFullError("m", "bound", 1)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(k)
                raise

    async def go():
        offload = Offload(1, INLINE_VALUES)
        try:
            await bound.evaluate(Runner(), np.zeros((6, 4), np.float32), bound.plan(6, 10, 10), 0, 2, window=3,
                                 offload=offload)
        finally:
            offload.shutdown()

    with pytest.raises(QueueFullError):
        asyncio.run(go())
    assert started == [0, 1, 2] and sorted(cancelled) == [0, 2]  # chunks 3-5 were never even drawn


def test_budget_admits_until_full_then_refuses():
    b = WorkBudget(100, 2, Metrics())
    b.acquire(500, "m")  # larger than the whole budget: runs, but only alone
    with pytest.raises(BusyError) as e:
        b.acquire(1, "m")
    p = problem_for(e.value, retry_after_s=2)  # as answered
    assert p.status == 429 and p.headers == {"Retry-After": "2"} and p.slug == "queue-full"
    b.release(500)
    b.acquire(60, "m")
    b.acquire(40, "m")
    with pytest.raises(BusyError):
        b.acquire(1, "m")
    b.release(40)
    b.acquire(40, "m")


def test_non_finite_log_w_names_the_image():
    p = bound.plan(3, 4, 100)
    post = bound.reducer(p, first=5)
    lw = np.zeros((3, 4), np.float32)
    elbo, iw = post({"log_w": lw})
    np.testing.assert_array_equal(elbo, 0.0)
    np.testing.assert_allclose(iw, 0.0, atol=1e-12)
    lw[1, 2] = np.nan
    with pytest.raises(NonFiniteOutputError) as e:
        post({"log_w": lw})
    assert e.value.row == 6 and e.value.output == "log_w"


# ------------------------------------------------------------------------------------------------
# Real HTTP
# ------------------------------------------------------------------------------------------------


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_one_budget_shared_by_all_endpoints_gives_429(model_repo, need, digits, tmp_path):
    name = need("vae-digits")
    server = start_server(model_repo, tmp_path / "server.log", default_model=name, max_inflight_work=600,
                          inference_workers=1, bound_chunk_rows=40)
    x = (digits.test[:1] >= 0.5).astype(float).tolist()
    try:
        async def go():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                lls = [c.post(f"/log-likelihood?samples=600&seed={i}", json={"images": x}) for i in range(12)]
                encs = [c.post("/encode", json={"images": x}) for _ in range(12)]
                rs = await asyncio.gather(*(r for pair in zip(lls, encs, strict=True) for r in pair))
                return rs[0::2], rs[1::2]

        lls, encs = asyncio.run(go())
        codes = {r.status_code for r in lls + encs}
        assert codes <= {200, 429} and 200 in codes
        refused = [r for r in lls + encs if r.status_code == 429]
        assert refused, "12 requests that each fill the budget, sent together, were all admitted"
        for r in refused:
            assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"] == "1"
            assert r.json()["type"] == "/problems/queue-full" and "budget" in r.json()["detail"]
        assert _metric(server.url, "latentserve_work_in_flight") == 0
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_client_gone_cancels_its_queued_chunks(model_repo, need, digits, tmp_path):
    name = need("vae-digits")
    # 16 images x 5000 samples in 16 chunks of 5000 one-sample calls: seconds of work at one thread
    server = start_server(model_repo, tmp_path / "server.log", default_model=name, inference_workers=1,
                          bound_chunk_rows=1)
    x = (digits.test[:16] >= 0.5).astype(float).tolist()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/log-likelihood?samples=5000&seed=1", json={"images": x}, timeout=0.5)
        deadline = time.monotonic() + 60
        while _metric(server.url, "latentserve_work_in_flight") > 0:  # the request has ended
            assert time.monotonic() < deadline, "the abandoned request still holds work"
            time.sleep(0.05)
        ran = _metric(server.url, 'latentserve_batch_size_count{graph="bound"')
        assert ran < 16, f"{ran} of 16 chunks ran for a client that had gone"
        r = httpx.post(server.url + "/log-likelihood?samples=10&seed=1", json={"images": x[:1]}, timeout=30)
        assert r.status_code == 200
        assert "client went away" in server.log() and "Traceback" not in server.log()
    finally:
        server.stop()


def test_response_image_size_is_capped(live):
    r = httpx.get(live.url + "/sample?n=256&scale=16", timeout=30)
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/response-too-large" and "format=json" in r.json()["detail"]
    r = httpx.get(live.url + "/sample?n=256&scale=4&seed=1", timeout=30)  # within the cap
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(r.content)).size == (4 * (16 * 9 + 1),) * 2  # 16 x 16 grid of 8x8 + 1 px gaps
    r = httpx.get(live.url + "/sample?n=256&scale=16&format=json&seed=1", timeout=30)
    assert r.status_code == 200 and len(r.json()["images"]) == 256


def _nan_decoder_repo(model_repo, tmp_path):
    """A copy of vae-digits as `nan-digits`, whose decoder gives x_mean = sqrt(sum(z)): NaN when sum(z) < 0."""
    import onnx
    from onnx import TensorProto, helper

    src = model_repo / "vae-digits"
    dst = tmp_path / "repo" / "nan-digits"
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    d, D = card["latent_dim"], card["data_dim"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["z", "ones"], ["s"]), helper.make_node("Sqrt", ["s"], ["x_mean"])],
        "nan_decoder", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("x_mean", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor("ones", TensorProto.FLOAT, [d, D], [1.0] * (d * D))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", card["onnx_opset"])])
    model.ir_version = 8
    onnx.save(model, dst / "decoder.onnx")
    data = (dst / "decoder.onnx").read_bytes()
    card["name"] = "nan-digits"
    card["files"]["decoder.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "card.json").write_text(json.dumps(card))
    return dst.parent, d


def test_non_finite_output_is_a_problem_not_null(model_repo, need, tmp_path):
    need("vae-digits")
    repo, d = _nan_decoder_repo(model_repo, tmp_path)
    server = start_server(repo, tmp_path / "server.log", default_model="nan-digits")
    try:
        ok = httpx.post(server.url + "/decode", json={"z": [[1.0] * d]}, timeout=30)
        assert ok.status_code == 200 and np.isfinite(ok.json()["images"]).all()
        for fmt in ("json", "png"):
            r = httpx.post(server.url + f"/decode?format={fmt}", json={"z": [[1.0] * d, [-1.0] * d]}, timeout=30)
            assert r.status_code == 422, r.text
            body = r.json()
            assert body["type"] == "/problems/non-finite-result" and body["output"] == "x_mean"
            assert body["detail"].startswith("z[1]:") and "|z|" in body["detail"]
            assert "null" not in r.text
        # Merged into one ONNX Runtime call with good requests, a bad one still fails alone (the batcher checks
        # finiteness once per merged call, then row by row only where it found a NaN).
        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                bodies = [{"z": [[1.0 - 2 * (i % 4 == 3)] * d]} for i in range(32)]
                rs = await asyncio.gather(*(client.post("/decode?format=json", json=b) for b in bodies))
            return [r.status_code for r in rs]

        assert asyncio.run(burst()) == [422 if i % 4 == 3 else 200 for i in range(32)]
        r = httpx.get(server.url + "/sample?n=16&seed=0&format=json", timeout=30)  # some draw has sum(z) < 0
        assert r.status_code == 422 and "temperature" in r.json()["detail"] and "null" not in r.text
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_outputs_never_hold_null(live, model_repo, data):
    """Whatever valid input a model gets, its answer holds numbers (or is a 422 that says why), never null."""
    names = sorted(p.name for p in model_repo.iterdir() if (p / "card.json").is_file())
    name = data.draw(st.sampled_from(names))
    card = json.loads((model_repo / name / "card.json").read_text())
    d, D = card["latent_dim"], card["data_dim"]
    pixels = st.lists(st.floats(0, 1), min_size=D, max_size=D)
    endpoint = data.draw(st.sampled_from(["encode", "decode", "log-likelihood"]))
    if endpoint == "decode":
        z = data.draw(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=d, max_size=d), min_size=1, max_size=3))
        r = httpx.post(f"{live.url}/decode?model={name}&format=json", json={"z": z}, timeout=30)
    else:
        images = data.draw(st.lists(pixels, min_size=1, max_size=3))
        query = f"model={name}&flow_params=true" if endpoint == "encode" else \
            f"model={name}&samples={data.draw(st.integers(1, 40))}&binarize={data.draw(st.booleans())}".lower()
        r = httpx.post(f"{live.url}/{endpoint}?{query}", json={"images": images}, timeout=30)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        _assert_no_null_numbers(r.json())
    if r.status_code == 422:
        assert r.json()["type"] == "/problems/non-finite-result"


def _assert_no_null_numbers(body) -> None:
    """No null inside any array, and every result's figures are numbers (null is legal only for absent fields)."""

    def walk(v):
        if isinstance(v, list):
            for item in v:
                assert item is not None, "null in an array"
                walk(item)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)

    walk(body)
    for result in body.get("results", []):
        for key in ("mean", "log_var", "log_likelihood", "elbo", "iw_bound"):
            if key in result:
                assert isinstance(result[key], (int, float, list)), (key, result[key])


def test_memory_is_handed_back_after_a_large_body(model_repo):
    """A request body of a megabyte or more, even one refused, is followed by a trim (service/memory.py): its
    freed chunks would otherwise stay in the allocator's arenas. Small bodies are not."""

    async def go(c, app):
        calls = []
        app.state.runtime.trimmer.soon = lambda: calls.append(1)
        big = b'{"images": [' + b",".join([b"[0.5]"] * 300_000) + b"]}"  # 1.8 MB of JSON, refused: too many values
        r = await c.post("/encode", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        small = await c.post("/encode", json={"images": [[0.0] * 64]})
        assert small.status_code == 200
        return calls

    assert run_async(settings_for(model_repo, default_model="ppca-digits"), go) == [1]
