"""Prometheus metrics, one registry per app (so that several apps in one process do not collide)."""

from __future__ import annotations

import time
from bisect import bisect_left
from itertools import accumulate

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


# The `model` label of a request that named no model folder of the repository: every such name shares it,
# so that clients cannot add series (memory, /metrics size) by inventing names.
UNKNOWN_MODEL = "(unknown)"


class LoopCounter:
    """One series of a LoopFamily counter."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value, self.created = 0.0, time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """One series of a LoopFamily histogram: a count per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum, self.created = bounds, [0] * (len(bounds) + 1), 0.0, time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value ("le")
        self.sum += value


class LoopFamily:
    """A counter or histogram whose every update comes from the event loop's thread: plain numbers, no lock.

    prometheus_client's Counter and Histogram take a lock on each update, which costs the event loop several
    microseconds per request for the series a request updates (docs/benchmarks.md, "Open Inference Protocol").
    The loop is one thread, so its updates need none; /metrics renders in a worker thread, which reads each
    series through copies that the GIL keeps whole. The exposition is prometheus_client's own (checked against
    its Counter and Histogram by tests/service/test_metrics.py).
    """

    def __init__(self, kind: str, name: str, documentation: str, labelnames: list[str],
                 buckets: tuple[float, ...] = ()):
        if kind not in ("counter", "histogram") or (kind == "histogram") != bool(buckets):
            raise ValueError(f"expected a counter, or a histogram with buckets; got {kind!r} with {buckets!r}")
        self.kind, self.name, self.documentation, self.labelnames = kind, name, documentation, labelnames
        self.bounds = tuple(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], LoopCounter | LoopHistogram] = {}

    def labels(self, *values: str) -> LoopCounter | LoopHistogram:
        """The series of these label values (made on first use: callers keep it, as with prometheus_client)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} has labels {self.labelnames}, got {len(values)} values")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = LoopHistogram(self.bounds) if self.bounds else LoopCounter()
        return series

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        les = [*map(floatToGoString, self.bounds), "+Inf"]
        for values, series in list(self._series.items()):
            if isinstance(series, LoopCounter):
                family.add_metric(values, series.value, created=series.created)
                continue
            total, counts = series.sum, list(series.counts)
            family.add_metric(values, list(zip(les, accumulate(counts), strict=True)), total)
            family.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, values, strict=True)),
                                         series.created))
        return [family]

    def _family(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # The repository's folder names (loaded or broken): the only model label values besides
        # UNKNOWN_MODEL and "-" (no model). Set when the models are loaded.
        self.known_models: frozenset[str] = frozenset()
        r = self.registry = CollectorRegistry(auto_describe=True)
        # Updated on the event loop, for every request or batch: lock-free (LoopFamily).
        self.requests = self._loop("counter", "latentserve_requests", "HTTP requests by endpoint, model and status",
                                   ["endpoint", "model", "status"])
        self.latency = self._loop("histogram", "latentserve_request_duration_seconds", "request latency (first byte "
                                  "in to response sent)", ["endpoint", "model"], LATENCY_BUCKETS)
        self.errors = self._loop("counter", "latentserve_errors", "requests answered 4xx/5xx, by endpoint, model and "
                                 "status", ["endpoint", "model", "status"])
        self.batch_requests = self._loop("histogram", "latentserve_batch_requests", "requests merged into one ONNX "
                                         "Runtime call", ["model", "graph"], ROW_BUCKETS)
        self.queue_time = self._loop("histogram", "latentserve_queue_time_seconds", "time a request waited in the "
                                     "batch queue", ["model", "graph"], LATENCY_BUCKETS)
        # Updated in the inference threads, once per ONNX Runtime call: prometheus_client's, with its lock.
        self.batch_rows = Histogram("latentserve_batch_size", "rows per ONNX Runtime call (after merging)",
                                    ["model", "graph"], buckets=ROW_BUCKETS, registry=r)
        self.inference_time = Histogram("latentserve_inference_seconds", "duration of one ONNX Runtime call",
                                        ["model", "graph"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("latentserve_queue_depth", "requests waiting in the batch queue",
                                 ["model", "graph"], registry=r)
        self.rejected = Counter("latentserve_queue_rejected", "requests refused with 429 (queue full)",
                                ["model", "graph"], registry=r)
        self.models_loaded = Gauge("latentserve_models_loaded", "models loaded and warmed up", registry=r)
        self.work_in_flight = Gauge("latentserve_work_in_flight", "rows of admitted work not yet answered, all "
                                    "endpoints together (the admission budget's use)", registry=r)
        # (endpoint, model, status) -> its series (`record`); bounded as the label values are
        self._children: dict[tuple[str, str, int], tuple] = {}
        self.models_broken = Gauge("latentserve_models_broken", "model folders skipped as broken", registry=r)

    def _loop(self, kind: str, name: str, documentation: str, labelnames: list[str],
              buckets: tuple[float, ...] = ()) -> LoopFamily:
        family = LoopFamily(kind, name, documentation, labelnames, buckets)
        self.registry.register(family)
        return family

    def record(self, endpoint: str, model: str, status: int, latency: float) -> None:
        """One answered request: its count, latency and (4xx/5xx) error, by label values already bounded."""
        key = (endpoint, model, status)
        children = self._children.get(key)
        if children is None:  # the label lookup, once per combination rather than once per request
            code = str(status)
            children = self._children[key] = (
                self.requests.labels(endpoint, model, code), self.latency.labels(endpoint, model),
                self.errors.labels(endpoint, model, code) if status >= 400 else None)
        requests, latency_child, errors = children
        requests.inc()
        latency_child.observe(latency)
        if errors is not None:
            errors.inc()

    def model_label(self, name: str | None) -> str:
        if name is None:
            return "-"
        return name if name in self.known_models else UNKNOWN_MODEL

    def render(self) -> bytes:
        return generate_latest(self.registry)
