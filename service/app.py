"""The FastAPI app: the factory, the models' loading in the lifespan, the routes and the middleware order.

    python -m service                             # uvicorn with read deadlines and a draining shutdown
    uvicorn --factory service.app:create_app      # the same app without those (service/server.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from service import oip, preprocess, web
from service.errors import install_error_handlers
from service.lane import InferenceLane
from service.logs import configure_logging
from service.metrics import Metrics
from service.middleware import APIKeyMiddleware, BodySizeLimitMiddleware, RequestContextMiddleware
from service.openapi import openapi
from service.routes import control, inference, models, operations
from service.runtime import Runtime
from service.settings import Settings


def routes(settings: Settings) -> list[BaseRoute]:
    """Every route of the service: the one place where a module of routes joins the app.

    The routes themselves, not app.include_router(router): an included router is matched through another
    layer of route contexts on every request (docs/benchmarks.md). The inference routes' requests skip the
    router (service/lane.py) unless OpenTelemetry is on; they come first for that case, as Starlette tries the
    routes in order.
    """
    return [*oip.infer_routes, *inference.endpoints.routes, *preprocess.endpoints.routes, *operations.router.routes,
            *models.router.routes, *control.router(settings).routes, *oip.routes]


async def _start(runtime: Runtime) -> None:
    await runtime.start()
    # Everything allocated so far (sessions, models, the app) lives as long as the process. Moving it out
    # of the collector's generations keeps full collections short: the gen-2 collections that request
    # garbage triggers every few seconds would otherwise walk all of it, which doubled p99 latency under
    # load (docs/benchmarks.md).
    gc.collect()
    gc.freeze()
    # The youngest generation's threshold: under load the objects of the requests in flight pass Python's default
    # (700) many times a second, and each collection walks them (every tenth the older generations too) to find
    # nothing: they are freed by reference counting once answered.
    gc.set_threshold(runtime.settings.gc_threshold, *gc.get_threshold()[1:])


@asynccontextmanager
async def lifespan(app: FastAPI):
    runtime: Runtime = app.state.runtime
    # Load in the background so that /health answers at once and /ready says 503 until the models are warm.
    app.state.loading_task = asyncio.create_task(_start(runtime), name="load-models")
    try:
        yield
    finally:
        task = app.state.loading_task
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # already logged by the task
            await task
        await runtime.stop()


class ServiceApp(FastAPI):
    """FastAPI with the inference lane in front of its stack (service/lane.py), unless OpenTelemetry is on (its
    layer is one the lane skips)."""

    def build_middleware_stack(self):
        full = super().build_middleware_stack()
        return full if self.state.settings.opentelemetry else InferenceLane(self, full)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Settings default to the environment (LATENTSERVE_*), read now, not at import."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = ServiceApp(
        title="latentserve",
        version="0.1.0",
        description="Encode, decode, sample and log-likelihood bounds of latent-variable image models "
                    "(PPCA, VAE, planar-flow VAE) with ONNX Runtime. Errors are application/problem+json "
                    "(RFC 9457).",
        lifespan=lifespan,
        # Off, FastAPI skips its per-request lookup of the global OpenTelemetry providers (loop CPU on every request)
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
        docs_url=None, redoc_url=None,  # served by service/web.py from local assets
        routes=routes(settings),
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = Runtime(settings, metrics)
    # The schema names the loaded models: built again after the registry loads, swaps or unloads one.
    app.state.runtime.registry.listeners.append(lambda: setattr(app, "openapi_schema", None))
    app.state.loading_task = None
    app.state.draining = False
    install_error_handlers(app)
    web.install(app)  # the page at /, its assets, /docs and /redoc
    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]
    # Middlewares: the last added is the outermost: CORS -> request id/log/metrics -> API key -> body limit. Their
    # errors, as every error, take the form of the path's API (service/errors.py).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       after_large_body=lambda: app.state.runtime.trimmer.soon())
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    return app
