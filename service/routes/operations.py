"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.context import RuntimeDep, SettingsDep, loading_done
from service.errors import problem_response
from service.metrics import Metrics
from service.openapi import error_responses
from service.schemas import Health, Ready

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="the process is alive")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, responses=error_responses(503),
            summary="at least one model loaded and warm, and every required model (503 until then)")
async def ready(request: Request, runtime: RuntimeDep, settings: SettingsDep):
    if request.app.state.draining:  # set by service/server.py on SIGTERM
        return problem_response(503, "Not ready", "the server is shutting down", "not-ready",
                                headers={"Retry-After": str(settings.retry_after_s)}, path=request.scope["path"])
    missing = runtime.registry.missing_required()  # LATENTSERVE_REQUIRED_MODELS
    if not runtime.ready or missing:
        detail = runtime.load_error or ("no models could be loaded" if loading_done(request) else "loading models")
        if runtime.ready:
            detail = f"required models not loaded yet: {', '.join(missing)}"
        return problem_response(503, "Not ready", detail, "not-ready", headers={"Retry-After": str(
            settings.retry_after_s)}, path=request.scope["path"])
    return {"status": "ready", "models": sorted(runtime.models), "default_model": runtime.default_model}


@router.get("/metrics", summary="Prometheus metrics", responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **error_responses(401)})
async def metrics(request: Request) -> Response:
    m: Metrics = request.app.state.metrics
    # Its label values are bounded (a few kB), but its size grows with the repository's folders: off the loop.
    return Response(await asyncio.to_thread(m.render), media_type=m.content_type)
