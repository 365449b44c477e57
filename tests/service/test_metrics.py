"""service/metrics.py: the lock-free series (LoopFamily) expose what prometheus_client's Counter and Histogram do."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import LATENCY_BUCKETS, ROW_BUCKETS, LoopFamily, Metrics


def _samples(text: bytes, names: set[str]) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of the families named `names`; `_created` samples only counted (their
    value is a clock reading)."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if family.name in names or s.name.removesuffix("_created") in names:
                out[(s.name, tuple(sorted(s.labels.items())))] = 0.0 if s.name.endswith("_created") else s.value
    return out


def _reference(observations) -> bytes:
    """prometheus_client's own series fed the same requests."""
    r = CollectorRegistry()
    requests = Counter("latentserve_requests", "HTTP requests by endpoint, model and status",
                       ["endpoint", "model", "status"], registry=r)
    latency = Histogram("latentserve_request_duration_seconds", "request latency (first byte in to response sent)",
                        ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
    errors = Counter("latentserve_errors", "requests answered 4xx/5xx, by endpoint, model and status",
                     ["endpoint", "model", "status"], registry=r)
    for endpoint, model, status, seconds in observations:
        requests.labels(endpoint, model, str(status)).inc()
        latency.labels(endpoint, model).observe(seconds)
        if status >= 400:
            errors.labels(endpoint, model, str(status)).inc()
    return generate_latest(r)


def test_request_series_equal_prometheus_clients_own():
    rng = random.Random(0)
    # Latencies on the buckets' bounds too: a bound's own value falls in its bucket ("le").
    observations = [(rng.choice(["/encode", "/v2/models/{name}/infer"]), rng.choice(["vae-mnist", "(unknown)"]),
                     rng.choice([200, 200, 404, 413, 500]),
                     rng.choice([rng.expovariate(200.0), rng.choice(LATENCY_BUCKETS), 30.0]))
                    for _ in range(2000)]
    m = Metrics()
    for obs in observations:
        m.record(*obs)
    names = {"latentserve_requests", "latentserve_request_duration_seconds", "latentserve_errors"}
    got, want = _samples(m.render(), names), _samples(_reference(observations), names)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert any(name.endswith("_created") for name, _ in got)


def test_histogram_family_against_prometheus_histogram():
    """The batcher's loop-side histograms (queue time, requests per batch) too, with integer bounds."""
    r = CollectorRegistry()
    reference = Histogram("latentserve_batch_requests", "requests merged", ["model", "graph"], buckets=ROW_BUCKETS,
                          registry=r)
    family = LoopFamily("histogram", "latentserve_batch_requests", "requests merged", ["model", "graph"], ROW_BUCKETS)
    mine = CollectorRegistry()
    mine.register(family)
    rng = random.Random(1)
    for _ in range(500):
        labels, n = (rng.choice(["a", "b"]), "encoder"), rng.choice([1, 2, 3, 8, 64, 65, 20000])
        reference.labels(*labels).observe(n)
        family.labels(*labels).observe(n)
    names = {"latentserve_batch_requests"}
    assert _samples(generate_latest(mine), names) == _samples(generate_latest(r), names)


def test_rendering_while_the_loop_records():
    """/metrics renders in a worker thread while the event loop adds series and counts: every render parses, and
    counts only grow."""
    m = Metrics()
    stop = threading.Event()

    def loop_side():
        i = 0
        while not stop.is_set():
            m.record(f"/e{i % 50}", "m", 200 + i % 3, 0.001)
            i += 1

    t = threading.Thread(target=loop_side)
    t.start()
    try:
        last = 0.0
        for _ in range(50):
            samples = _samples(m.render(), {"latentserve_requests"})
            total = sum(v for (name, _), v in samples.items() if name == "latentserve_requests_total")
            assert total >= last
            last = total
    finally:
        stop.set()
        t.join()
    assert last > 0


def test_bad_families_are_refused():
    with pytest.raises(ValueError, match="histogram with buckets"):
        LoopFamily("histogram", "x", "x", ["a"])
    with pytest.raises(ValueError, match="histogram with buckets"):
        LoopFamily("gauge", "x", "x", ["a"])
    with pytest.raises(ValueError, match="has labels"):
        LoopFamily("counter", "x", "x", ["a", "b"]).labels("only-one")
