"""Micro-batching: concurrent requests are merged, results are identical to unbatched calls, 429 when full."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from svc_helpers import image_bytes, run_async, settings_for

from service.batcher import GraphRunner, session_options
from service.metrics import Metrics


def _requests(names, digits):
    """(method, url, kwargs) for a mix of single- and multi-image requests over every graph."""
    reqs = []
    for i in range(24):
        name = names[i % len(names)]
        x = digits.test[i:i + 1 + (i % 3)]
        if i % 4 == 0:
            files = [("images", (f"{j}.png", image_bytes(row.reshape(8, 8)), "image/png")) for j, row in enumerate(x)]
            reqs.append(("POST", f"/encode?model={name}&flow_params=true", {"files": files}))
        else:
            reqs.append(("POST", f"/encode?model={name}&flow_params=true", {"json": {"images": x.tolist()}}))
        reqs.append(("POST", f"/log-likelihood?model={name}&samples={3 + i % 2}&seed={i}",
                     {"json": {"images": x.tolist()}}))
        # more samples than one call holds (bound_chunk_rows=5 below): each image is cut into slices
        reqs.append(("POST", f"/log-likelihood?model={name}&samples={6 + i % 7}&seed={i}",
                     {"json": {"images": x.tolist()}}))
        reqs.append(("GET", f"/sample?model={name}&n={1 + i % 5}&seed={i}&format=json", {}))
        reqs.append(("POST", f"/decode?model={name}",
                     {"json": {"z": np.random.default_rng(i).standard_normal((1 + i % 2, 4 + (name == "ppca-digits"))
                                                                            ).tolist()}}))
    return reqs


def _run_all(settings, reqs, concurrent: bool):
    async def go(c, app):
        async def one(req):
            method, url, kw = req
            r = await c.request(method, url, **kw)
            assert r.status_code == 200, (url, r.text)
            return r.json()

        if concurrent:
            out = await asyncio.gather(*(one(r) for r in reqs))
        else:
            out = [await one(r) for r in reqs]
        return out, app.state.metrics.render().decode()

    return run_async(settings, go)


def test_concurrent_batched_results_identical_to_unbatched(model_repo, digits):
    names = [p.name for p in sorted(model_repo.iterdir()) if (p / "card.json").is_file()]
    reqs = _requests(names, digits)
    batched, metrics = _run_all(settings_for(model_repo, batching=True, max_queue_delay_ms=20.0, bound_chunk_rows=5),
                                reqs, True)
    unbatched, _ = _run_all(settings_for(model_repo, batching=False, bound_chunk_rows=5), reqs, False)
    for a, b in zip(batched, unbatched, strict=True):
        a.pop("seed", None), b.pop("seed", None)
        assert a == b  # bit for bit: the JSON floats are the float32 results
    # requests were merged: some ONNX Runtime call served more than one request
    merged = [line for line in metrics.splitlines()
              if line.startswith("latentserve_batch_requests_bucket") and 'le="1.0"' in line]
    counts = [line for line in metrics.splitlines() if line.startswith("latentserve_batch_requests_count")]
    total_calls = sum(float(c.rsplit(" ", 1)[1]) for c in counts)
    single_calls = sum(float(m.rsplit(" ", 1)[1]) for m in merged)
    assert single_calls < total_calls, "no request was ever merged with another"
    assert total_calls < len(reqs) * 0.9


def test_queue_full_answers_429_with_retry_after(model_repo):
    settings = settings_for(model_repo, batching=True, max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0,
                            inference_workers=1)

    async def go(c, app):
        rs = await asyncio.gather(*(c.post("/encode?model=ppca-digits", json={"images": [[0.0] * 64]})
                                    for _ in range(30)))
        return [r.status_code for r in rs], [r for r in rs if r.status_code == 429]

    codes, rejected = run_async(settings, go)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes
    assert rejected[0].headers["retry-after"] == "1"
    assert rejected[0].headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("batching", [True, False])
def test_unbatched_mode_bounded_too(model_repo, batching):
    settings = settings_for(model_repo, batching=batching, max_queue_size=2, inference_workers=1)

    async def go(c, app):
        rs = await asyncio.gather(*(c.post("/log-likelihood?model=ppca-digits", json={"images": [[0.0] * 64] * 8})
                                    for _ in range(20)))
        return [r.status_code for r in rs]

    codes = run_async(settings, go)
    assert set(codes) <= {200, 429} and 200 in codes


def test_per_request_error_isolation(model_repo):
    """A merged call that fails is rerun request by request: only the bad request fails."""
    import onnxruntime as ort

    settings = settings_for(model_repo, max_queue_delay_ms=50.0)
    session = ort.InferenceSession(str(model_repo / "ppca-digits" / "encoder.onnx"), session_options(settings))

    async def go():
        from concurrent.futures import ThreadPoolExecutor

        runner = GraphRunner("ppca-digits", "encoder", session, settings=settings, executor=ThreadPoolExecutor(2),
                             metrics=Metrics(), max_cost=64)
        runner.start(1)
        good = [np.full((1, 64), i / 10, np.float32) for i in range(4)]
        bad = np.zeros((1, 64), np.float64)  # same shape, wrong dtype: the merged call fails
        results = await asyncio.gather(*(runner.run({"x": g}) for g in good[:2]), runner.run({"x": bad}),
                                       *(runner.run({"x": g}) for g in good[2:]), return_exceptions=True)
        await runner.stop()
        return good, results

    good, results = asyncio.run(go())
    assert isinstance(results[2], Exception)
    oks = [results[i] for i in (0, 1, 3, 4)]
    for g, res in zip(good, oks, strict=True):
        assert isinstance(res, dict)
        np.testing.assert_array_equal(res["mean"], session.run(["mean"], {"x": g})[0])


def test_queue_depth_gauge_reads_the_queue(model_repo):
    """latentserve_queue_depth is read from the queue when /metrics renders."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime as ort

    settings = settings_for(model_repo, max_queue_delay_ms=0.0, max_batch_size=1)
    session = ort.InferenceSession(str(model_repo / "ppca-digits" / "encoder.onnx"), session_options(settings))
    metrics, gate = Metrics(), threading.Event()

    def depth() -> float:
        return metrics.registry.get_sample_value("latentserve_queue_depth", {"model": "ppca-digits",
                                                                             "graph": "encoder"})

    async def go():
        executor = ThreadPoolExecutor(1)
        executor.submit(gate.wait)  # the inference thread is busy: what is queued stays queued
        runner = GraphRunner("ppca-digits", "encoder", session, settings=settings, executor=executor,
                             metrics=metrics, max_cost=1)  # one request per call
        runner.start(1)
        tasks = [asyncio.ensure_future(runner.run({"x": np.zeros((1, 64), np.float32)})) for _ in range(5)]
        await asyncio.sleep(0.05)
        queued = depth()  # one taken by the worker (waiting for the thread), four queued
        gate.set()
        await asyncio.gather(*tasks)
        after = depth()
        await runner.stop()
        return queued, after

    assert asyncio.run(go()) == (4, 0)
