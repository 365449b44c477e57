"""Prometheus metrics, one registry per app (so that several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


# The `model` label of a request that named no model folder of the repository: every such name shares it,
# so that clients cannot add series (memory, /metrics size) by inventing names.
UNKNOWN_MODEL = "(unknown)"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # The repository's folder names (loaded or broken): the only model label values besides
        # UNKNOWN_MODEL and "-" (no model). Set when the models are loaded.
        self.known_models: frozenset[str] = frozenset()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("latentserve_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("latentserve_request_duration_seconds", "request latency (first byte in to "
                                 "response sent)", ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("latentserve_errors", "requests answered 4xx/5xx, by endpoint, model and status",
                              ["endpoint", "model", "status"], registry=r)
        self.batch_rows = Histogram("latentserve_batch_size", "rows per ONNX Runtime call (after merging)",
                                    ["model", "graph"], buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("latentserve_batch_requests", "requests merged into one ONNX Runtime call",
                                        ["model", "graph"], buckets=ROW_BUCKETS, registry=r)
        self.queue_time = Histogram("latentserve_queue_time_seconds", "time a request waited in the batch queue",
                                    ["model", "graph"], buckets=LATENCY_BUCKETS, registry=r)
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
