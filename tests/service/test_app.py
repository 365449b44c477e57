"""API key, CORS, broken model folders, readiness, and a property-based fuzz run against the OpenAPI schema."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import settings_for, wait_ready

from service.app import create_app


def test_api_key_and_cors(model_repo):
    app = create_app(settings_for(model_repo, api_key="s3cret", cors_origins=["https://example.org"]))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        wait_ready(c)
        for path in ("/models", "/metrics", "/openapi.json", "/sample?model=ppca-digits"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", path
        assert c.get("/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        pre = c.options("/encode", headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "https://example.org"
        r = c.get("/health", headers={"Origin": "https://example.org"})
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        assert "apiKey" in c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()["components"][
            "securitySchemes"]


def test_broken_model_folder_is_skipped(model_repo, tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(model_repo / "ppca-digits", repo / "ppca-digits")
    shutil.copytree(model_repo / "ppca-digits", repo / "ppca-broken")
    (repo / "ppca-broken" / "encoder.onnx").write_bytes(b"corrupt")
    (repo / "no-card").mkdir()
    (repo / "no-card" / "decoder.onnx").write_bytes(b"x")
    app = create_app(settings_for(repo, default_model="ppca-broken"))
    with TestClient(app) as c:
        wait_ready(c)
        listing = c.get("/models").json()
        assert [m["name"] for m in listing["models"]] == ["ppca-digits"]
        assert "sha256" in listing["unavailable"]["ppca-broken"] and "no-card" in listing["unavailable"]
        assert listing["default_model"] == "ppca-digits"
        r = c.post("/encode?model=ppca-broken", json={"images": [[0.0] * 64]})
        assert r.status_code == 404 and "failed validation" in r.json()["detail"]


def test_not_ready_without_models(tmp_path):
    app = create_app(settings_for(tmp_path / "missing"))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.post("/encode", json={"images": [[0.0] * 64]}).status_code == 503


def test_startup_heap_is_frozen_out_of_the_collector(model_repo):
    """Once the models are loaded the start-up heap is frozen (gc.freeze), so full collections under load
    do not walk it (the p99 latency fix of docs/benchmarks.md), and young collections come at GC_THRESHOLD."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    before = gc.get_threshold()
    try:
        with TestClient(create_app(settings_for(model_repo, gc_threshold=4321))) as c:
            wait_ready(c)
            assert gc.get_freeze_count() > 10_000
            # and the youngest generation is collected at the setting's threshold, the older ones as before
            assert gc.get_threshold() == (4321, *before[1:])
    finally:
        gc.set_threshold(*before)


def _load_hooks():
    """The project's schemathesis hooks (tests/schemathesis_hooks.py, which schemathesis.toml names for `st`)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "schemathesis_hooks.py"
    spec = importlib.util.spec_from_file_location("latentserve_schemathesis_hooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_openapi_schema(model_repo):
    """schemathesis: generated requests for every operation give no 500 and conform to the schema, and the
    schema-valid ones are accepted: with the project's hooks, which supply what JSON Schema cannot state
    (real image files, rectangular JSON images, the lengths of the model named), every refusal counts."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance
    from schemathesis.specs.openapi.formats import unregister_string_format

    # schemathesis calls the app from its own event loop: no batcher queues (bound to the first loop)
    app = create_app(settings_for(model_repo, default_model="ppca-digits", max_samples=16, batching=False,
                                  max_importance_samples=50, max_temperature=5.0, max_png_scale=8))
    hooks = _load_hooks()  # registers its hooks and the `binary` format's strategy, globally: undone below
    try:
        with TestClient(app) as c:
            wait_ready(c)
            spec = c.get("/openapi.json").json()
            n = next(p for p in spec["paths"]["/sample"]["get"]["parameters"] if p["name"] == "n")
            assert n["schema"]["maximum"] == 16  # the live Settings, not the query model's bound
            schema = schemathesis.openapi.from_asgi("/openapi.json", app)
            failures = []
            for op in schema.get_all_operations():
                operation = op.ok()

                @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy())
                def run(case):
                    response = case.call()
                    assert response.status_code < 500, (case.path, response.text)
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])
                    if case.meta.generation.mode.is_positive:
                        assert response.status_code < 400 or response.status_code in (401, 404, 429), (
                            f"schema-valid request rejected: {case.path} {case.query} {str(case.body)[:300]} -> "
                            f"{response.status_code} {response.text[:300]}")

                try:
                    run()
                except BaseException as e:  # noqa: BLE001 - collect all operations' failures
                    failures.append(f"{operation.method.upper()} {operation.path}: {str(e)[:600]}")
            assert not failures, "\n".join(failures)
    finally:
        unregister_string_format("binary")
        schemathesis.hooks.unregister(hooks.map_case)
        schemathesis.hooks.unregister(hooks.before_add_examples)
