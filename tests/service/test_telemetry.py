"""LATENTSERVE_OPENTELEMETRY: FastAPI's native OpenTelemetry spans only when the operator asks for them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from svc_helpers import image_bytes, settings_for, wait_ready

from service.app import create_app

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is in the dev extra")


@pytest.fixture(scope="module")
def spans():
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the process's global provider, as opentelemetry-instrument sets it
    return exporter


@pytest.mark.parametrize("enabled", [False, True])
def test_spans_only_when_enabled(model_repo, spans, enabled):
    import numpy as np

    spans.clear()
    app = create_app(settings_for(model_repo, opentelemetry=enabled, default_model="ppca-digits"))
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/encode", files=[("images", ("d.png", image_bytes(np.eye(8)), "image/png"))])
        assert r.status_code == 200, r.text
    names = [s.name for s in spans.get_finished_spans()]
    if enabled:
        assert "POST /encode" in names, names
    else:
        assert names == []
