"""The FastAPI app: factory, lifespan, dependencies and thin route handlers.

    python -m service                             # uvicorn with read deadlines and a draining shutdown
    uvicorn --factory service.app:create_app      # the same app without those (service/server.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute

from service import bound, control
from service import inference as infer
from service import postprocess as post
from service.api_schema import _BODY_SCHEMAS, _DECODE_BODY, _IMAGE_BODY, _query_openapi, openapi_limits
from service.errors import PROBLEM_MEDIA_TYPE, ProblemError, install_error_handlers, problem_response
from service.inputs import _check_count, read_images, read_json, read_query
from service.metrics import Metrics
from service.middleware import APIKeyMiddleware, BodySizeLimitMiddleware, RequestContextMiddleware
from service.oip import install as install_oip
from service.runtime import LoadedModel, Runtime
from service.schemas import (
    DecodeQuery,
    DecodeRequest,
    EncodeQuery,
    EncodeResponse,
    Health,
    ImagesResponse,
    LogLikelihoodQuery,
    LogLikelihoodResponse,
    ModelDetail,
    ModelsResponse,
    Problem,
    Ready,
    SampleQuery,
    SampleResponse,
)
from service.settings import Settings

log = logging.getLogger("service")
BINARIZATION = "x >= 0.5 -> 1, else 0 (after resizing and invert)"
LOG2 = math.log(2.0)

# ------------------------------------------------------------------------------------------------
# Dependencies (async although they never await: FastAPI runs a plain `def` dependency in its thread
# pool, one thread hop per dependency per request)
# ------------------------------------------------------------------------------------------------


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def resolve_model(request: Request, name: str | None) -> LoadedModel:
    """The loaded model called `name` (the default model for None); 503 until ready, 404 if unknown.

    The inference endpoints call this directly instead of declaring it as a dependency, for the same
    reason as `read_query`.
    """
    runtime: Runtime = request.app.state.runtime
    if not runtime.ready:
        detail = runtime.load_error or ("no models are loaded" if runtime.models == {} and _loaded(request)
                                        else "the models are still loading")
        raise ProblemError(503, "Not ready", detail, slug="not-ready",
                           headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    name = runtime.default_model if name is None else name  # an empty name names no model (404)
    request.state.model = name
    if name in runtime.models:
        return runtime.models[name]
    if name in runtime.broken:
        raise ProblemError(404, "Unknown model", f"model {name!r} is unavailable: its folder failed validation "
                           f"({runtime.broken[name]})", slug="unknown-model")
    raise ProblemError(404, "Unknown model", f"model {name!r} is not loaded; loaded models: "
                       f"{', '.join(sorted(runtime.models)) or 'none'}", slug="unknown-model")


def json_response(content: dict, status_code: int = 200) -> Response:
    """`content` (numpy arrays allowed) as JSON, serialized by orjson (service/postprocess.py `dumps`).

    Returning a Response skips FastAPI's re-validation of the result against the route's
    response_model (which stays for the OpenAPI schema; the tests check the responses against it).
    """
    return Response(post.dumps(content), status_code=status_code, media_type="application/json")


def _loaded(request: Request) -> bool:
    return request.app.state.loading_task is not None and request.app.state.loading_task.done()


# ------------------------------------------------------------------------------------------------
# OpenAPI helpers
# ------------------------------------------------------------------------------------------------

_ERRORS = {
    400: "Malformed request (multipart syntax, Content-Length)",
    401: "API key missing or wrong (when the service has one)",
    404: "Unknown model",
    413: "Body, image, request or response image too large",
    415: "Unsupported media type (request body or image format)",
    422: "Invalid input: says what was expected",
    429: "Busy (work budget or queue full): retry after the Retry-After header's seconds",
    503: "Models not loaded yet",
}


def _errors(*codes: int) -> dict:
    return {c: {"model": Problem, "description": _ERRORS[c]} for c in codes}


_PNG_OR_JSON = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus: problem+json for every error, the image request body, the API key."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for body in _BODY_SCHEMAS:
        extra = body.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(extra.pop("$defs", {}))
        comps[body.__name__] = extra
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            for code, resp in op.get("responses", {}).items():
                if code.isdigit() and int(code) >= 400:
                    resp["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
                    if code in ("429", "503"):
                        resp["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds"}}
    if app.state.settings.api_key is not None:
        schema["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        schema["security"] = [{"apiKey": []}, {"bearer": []}]
    runtime: Runtime = app.state.runtime
    openapi_limits(schema, app.state.settings, list(runtime.models.values()) if runtime.ready else None,
                   runtime.default_model)
    if runtime.ready:  # the schema states the loaded models' sizes: kept once they are known
        app.openapi_schema = schema
    return schema




def _bits_per_dim(card, ll: float, binarized: bool) -> tuple[float | None, str | None]:
    D = card.data_dim
    if card.likelihood == "gaussian":
        return ((-ll + D * math.log(256.0)) / (D * LOG2),
                "density on [0, 1] data read as 256 levels per pixel: (-log p(x) + D log 256) / (D ln 2)")
    if binarized:
        return -ll / (D * LOG2), "binary data, a probability mass: -log p(x) / (D ln 2)"
    return None, None


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------

class RequestRoute(APIRoute):
    """A route whose handler takes the Request alone and returns a Response: FastAPI calls it as it is.

    For any other route FastAPI solves the handler's dependency graph and inspects its result on every
    request, even when there is nothing to solve: about a tenth of POST /encode's time on the event loop.
    The inference handlers read their query and body themselves (read_query, read_images, read_json), so
    they need none of it. The route is still an APIRoute: OpenAPI documents it like any other.
    """

    def __init__(self, path: str, endpoint: Callable, **kwargs):
        names = list(inspect.signature(endpoint).parameters)
        if names != ["request"]:
            raise TypeError(f"{endpoint.__name__}: a RequestRoute handler takes (request) alone, got {names}")
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        return self.endpoint


router = APIRouter()  # operations and models
inference = APIRouter(route_class=RequestRoute)  # encode, decode, sample, log-likelihood


@router.get("/health", response_model=Health, tags=["operations"], summary="the process is alive")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", response_model=Ready, tags=["operations"], responses=_errors(503),
            summary="at least one model loaded and warm, and every required model (503 until then)")
async def ready(request: Request, runtime: RuntimeDep, settings: SettingsDep):
    if request.app.state.draining:  # set by service/server.py on SIGTERM
        return problem_response(503, "Not ready", "the server is shutting down", "not-ready",
                                headers={"Retry-After": str(settings.retry_after_s)})
    missing = runtime.registry.missing_required()  # LATENTSERVE_REQUIRED_MODELS
    if not runtime.ready or missing:
        detail = runtime.load_error or ("no models could be loaded" if _loaded(request) else "loading models")
        if runtime.ready:
            detail = f"required models not loaded yet: {', '.join(missing)}"
        return problem_response(503, "Not ready", detail, "not-ready", headers={"Retry-After": str(
            settings.retry_after_s)})
    return {"status": "ready", "models": sorted(runtime.models), "default_model": runtime.default_model}


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics", responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
    **_errors(401)})
async def metrics(request: Request) -> Response:
    m: Metrics = request.app.state.metrics
    # Its label values are bounded (a few kB), but its size grows with the repository's folders: off the loop.
    return Response(await asyncio.to_thread(m.render), media_type=m.content_type)


@router.get("/models", response_model=ModelsResponse, tags=["models"], responses=_errors(401),
            summary="the loaded models with their cards")
async def list_models(runtime: RuntimeDep) -> dict:
    return {
        "default_model": runtime.default_model,
        "models": [dict(m.summary(), default=m.name == runtime.default_model)
                   for m in sorted(runtime.models.values(), key=lambda m: m.name)],
        "unavailable": dict(runtime.broken),
    }


@router.get("/models/{name}", response_model=ModelDetail, tags=["models"], responses=_errors(401, 404, 503),
            summary="one model and its full card")
async def get_model_info(request: Request, runtime: RuntimeDep,
                         name: Annotated[str, Path(max_length=200, description="model name")]) -> dict:
    m = resolve_model(request, name)
    return dict(m.summary(), default=m.name == runtime.default_model, card=m.card.raw)


@inference.post("/encode", response_model=EncodeResponse, tags=["inference"],
             responses=_errors(400, 401, 404, 413, 415, 422, 429, 503),
             openapi_extra=_query_openapi(EncodeQuery, **_IMAGE_BODY),
             summary="images -> posterior mean and log-variance")
async def encode(request: Request) -> Response:
    """Encode images: each image's posterior `mean` and `log_var` (the exact posterior for ppca).

    Send the images as multipart/form-data (file parts named `images`: PNG, JPEG, BMP, GIF, TIFF, WebP) or
    as JSON `{"images": [...]}` (H x W arrays, H x W x 3 for colour models, or flat arrays of D intensities in
    [0, 1]). Images are converted to the model's `channels` (grayscale models: colour to gray; colour models:
    RGB; transparent pixels on white); other sizes are resized to the model's
    `image_shape` and the result says `resized`. The models expect light ink on black (MNIST): use
    `invert=true` for dark ink on a light background. Flow models also give `z_k`, the mean pushed through
    the K planar flows.
    """
    q = read_query(request, EncodeQuery)
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    prepared = await read_images(request, settings, model, q.invert)
    x = np.stack([p.x for p in prepared])
    request.state.batch_size = len(prepared)
    flows = model.card.flows > 0
    try:
        out = await infer.run(request, model, "encoder", {"x": x}, post.ENCODER_POST[flows])
    except post.NonFiniteOutputError as e:
        raise post.non_finite_problem(e, prepared[e.row].source, "the encoder cannot represent this image (the "
                                      "models expect light ink on black: try invert=true)") from e
    results = []
    for i, p in enumerate(prepared):
        r = {"source": p.source, "original_shape": p.original_shape, "resized": p.resized,
             "mean": out["mean"][i], "log_var": out["log_var"][i], "z_k": None, "flow": None}
        if flows:
            r["z_k"] = out["z_k"][i]
            if q.flow_params:
                r["flow"] = {"u": out["flow_u"][i], "w": out["flow_w"][i], "b": out["flow_b"][i]}
        results.append(r)
    content = {"model": model.name, "kind": model.card.kind, "latent_dim": model.card.latent_dim,
               "inverted": q.invert, "results": results}
    d, K = model.card.latent_dim, model.card.flows
    size = len(results) * (3 * d + (K * (2 * d + 1) if q.flow_params else 0))  # numbers answered
    if size > post.INLINE_VALUES:  # off the loop; the common small answer skips the detour
        return await request.app.state.runtime.offload.json(content, size)
    return json_response(content)


@inference.post("/decode", response_model=ImagesResponse, tags=["inference"],
             responses={200: {**_PNG_OR_JSON, "description": "JSON images, or a PNG (one image or a grid)"},
                        **_errors(400, 401, 404, 413, 415, 422, 429, 503)},
             openapi_extra=_query_openapi(DecodeQuery, **_DECODE_BODY), summary="latent codes -> images (JSON or PNG)")
async def decode(request: Request) -> Response:
    """Decode latent codes `z` ([N][latent_dim]) to E[x | z], clipped to [0, 1].

    JSON (H x W arrays, H x W x 3 for colour models) or PNG (one image, or a grid for several; RGB for colour
    models): `format=json|png`, or the Accept header
    (`image/png`); JSON by default.
    """
    q = read_query(request, DecodeQuery)
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    d = model.card.latent_dim
    body = await read_json(request, DecodeRequest, f'{{"z": [[...], ...]}}, each code {d} finite numbers',
                           max_arrays=settings.max_images + 1, max_values=settings.max_images * d)
    _check_count(len(body.z), settings)
    bad = [i for i, row in enumerate(body.z) if len(row) != d]
    if bad:
        raise ProblemError(422, "Wrong latent size", f"z[{bad[0]}] has {len(body.z[bad[0]])} values; model "
                           f"{model.name!r} has latent_dim {d}", slug="wrong-latent-size")
    z = np.asarray(body.z, dtype=np.float64)
    if not np.isfinite(z).all():
        raise ProblemError(422, "Invalid latent values", "z holds NaN or infinite values (expected finite numbers)",
                           slug="invalid-latent-values")
    if np.abs(z).max() > settings.max_latent_abs:
        raise ProblemError(422, "Invalid latent values", f"|z| must be <= {settings.max_latent_abs:g} (the prior "
                           f"is N(0, I)), got {np.abs(z).max():.4g}", slug="invalid-latent-values")
    request.state.batch_size = len(z)
    png = infer.png_checked(request, model, q.format, "json", len(z), q.scale, settings)
    try:
        x = await infer.run(request, model, "decoder", {"z": z.astype(np.float32)},
                            post.decoder_post(model.card.pixel_shape))
    except post.NonFiniteOutputError as e:
        raise post.non_finite_problem(e, f"z[{e.row}]", f"use a code closer to the prior N(0, I) (this one has |z| "
                                      f"up to {np.abs(z[e.row]).max():.4g})") from e
    return await infer.image_response(request, model, x, png, q.scale)


@inference.get("/sample", response_model=SampleResponse, tags=["inference"],
            responses={200: {**_PNG_OR_JSON, "description": "a PNG grid (default) or JSON"},
                       **_errors(401, 404, 413, 422, 429, 503)},
            openapi_extra=_query_openapi(SampleQuery), summary="samples from the prior through the decoder")
async def sample(request: Request) -> Response:
    """`n` images E[x | z] with z = temperature * N(0, I) drawn by `numpy.random.default_rng(seed)`.

    A PNG grid by default, upscaled 4 times so that a browser shows 28x28 digits at a readable size;
    JSON with `format=json` or Accept: application/json.
    """
    q = read_query(request, SampleQuery)
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    n, temperature = q.n, q.temperature  # within the service's limits (read_query)
    seed = secrets.randbits(63) if q.seed is None else q.seed
    z = (temperature * np.random.default_rng(seed).standard_normal((n, model.card.latent_dim))).astype(np.float32)
    request.state.batch_size = n
    png = infer.png_checked(request, model, q.format, "png", n, q.scale, settings)
    try:
        x = await infer.run(request, model, "decoder", {"z": z}, post.decoder_post(model.card.pixel_shape))
    except post.NonFiniteOutputError as e:
        raise post.non_finite_problem(e, f"sample {e.row} (seed {seed})", f"lower the temperature (now "
                                      f"{temperature:g})") from e
    return await infer.image_response(request, model, x, png, q.scale,
                                      {"seed": seed, "temperature": temperature, "z": z})


@inference.post("/log-likelihood", response_model=LogLikelihoodResponse, tags=["inference"],
             responses=_errors(400, 401, 404, 413, 415, 422, 429, 503),
             openapi_extra=_query_openapi(LogLikelihoodQuery, **_IMAGE_BODY),
             summary="ELBO, importance-weighted bound (exact for ppca) and bits/dim per image")
async def log_likelihood(request: Request) -> Response:
    """Per image: the ELBO, the importance-weighted bound with S samples, bits/dim; exact for ppca.

    Images as for /encode. For the VAEs, eps = `numpy.random.default_rng(seed).standard_normal((N, S, d),
    dtype=float32)` for the N images of the request, fed to the model's bound graph: log_w [N, S]; ELBO = mean
    over S, bound = logsumexp - log S (models/README.md). Bernoulli models evaluate binarized input: each
    intensity >= 0.5 becomes 1, the rest 0 (after resizing and `invert`); `binarize=false` evaluates the
    intensities as they are (no bits/dim then). PPCA's log p(x) is exact (`log_likelihood_exact`).
    """
    q = read_query(request, LogLikelihoodQuery)
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    card = model.card
    prepared = await read_images(request, settings, model, q.invert)
    x = np.stack([p.x for p in prepared])
    N = len(x)
    request.state.batch_size = N
    binarized = card.likelihood == "bernoulli" and q.binarize
    if binarized:
        x = (x >= 0.5).astype(np.float32)
    advice = ("the model gives this image no finite log-likelihood" + (": evaluate it binarized (binarize=true)"
              if card.likelihood == "bernoulli" and not binarized else "; check that it is light ink on black "
              "(invert=true otherwise)"))
    if card.kind == "ppca":
        try:
            out = await infer.run(request, model, "loglik", {"x": x}, post.finite_post(["log_px"]))
        except post.NonFiniteOutputError as e:
            raise post.non_finite_problem(e, prepared[e.row].source, advice) from e
        ll = out["log_px"].astype(np.float64)
        elbo = iw = ll
        S, seed = None, None
    else:
        S = q.samples or settings.default_importance_samples  # at most max_importance_samples (read_query)
        work, limit = N * S, bound.max_work(settings)
        if work > limit:
            raise ProblemError(413, "Too much work", f"{N} images x {S} samples = {work} evaluations; the limit "
                               f"is {limit}: send fewer images or samples", slug="too-much-work")
        seed = secrets.randbits(63) if q.seed is None else q.seed
        runtime: Runtime = request.app.state.runtime
        plan = bound.plan(N, S, settings.bound_chunk_rows)
        try:
            elbo, iw = await infer.admit(request, model, plan.cost, lambda: bound.evaluate(
                model.runners["bound"], x, plan, seed, card.latent_dim, window=settings.inference_workers,
                offload=runtime.offload))
        except post.NonFiniteOutputError as e:
            raise post.non_finite_problem(e, prepared[e.row].source, advice) from e
        ll = iw
    note = None
    results = []
    for i, p in enumerate(prepared):
        bpd, note = _bits_per_dim(card, float(ll[i]), binarized)
        results.append({"source": p.source, "original_shape": list(p.original_shape), "resized": p.resized,
                        "log_likelihood": float(ll[i]), "log_likelihood_exact": card.kind == "ppca",
                        "elbo": float(elbo[i]), "iw_bound": float(iw[i]), "bits_per_dim": bpd})
    return json_response({"model": model.name, "kind": card.kind, "likelihood": card.likelihood, "samples": S,
                          "seed": seed, "binarized": binarized, "binarization": BINARIZATION if binarized else None,
                          "bits_per_dim_note": note, "results": results})


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------


class JSONLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{"):
            return msg  # already a JSON line (the access log)
        out = {"event": "log", "level": record.levelname.lower(), "logger": record.name, "message": msg}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str) -> None:
    logger = logging.getLogger("service")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_latentserve", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JSONLogFormatter())
        handler._latentserve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


async def _start(runtime: Runtime) -> None:
    await runtime.start()
    # Everything allocated so far (sessions, models, the app) lives as long as the process. Moving it out
    # of the collector's generations keeps full collections short: without this, the gen-2 collections
    # that request garbage triggers every few seconds walked all of it, and p99 latency at 64 clients
    # was 90-100 ms instead of 45 ms (docs/benchmarks.md).
    gc.collect()
    gc.freeze()


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


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Settings default to the environment (LATENTSERVE_*), read now, not at import."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="latentserve",
        version="0.1.0",
        description="Encode, decode, sample and log-likelihood bounds of latent-variable image models "
                    "(PPCA, VAE, planar-flow VAE) with ONNX Runtime. Errors are application/problem+json "
                    "(RFC 9457).",
        lifespan=lifespan,
        # Off, FastAPI skips its per-request lookup of the global OpenTelemetry providers (loop CPU on every request)
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
        # The routes themselves, not app.include_router(router): an included router is matched through
        # another layer of route contexts on every request (about 8 % of POST /encode's time).
        routes=[*inference.routes, *router.routes, *control.router(settings).routes],
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
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Middlewares: the last added is the outermost: CORS -> request id/log/metrics -> /v2 errors -> API key ->
    # body limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       after_large_body=lambda: app.state.runtime.trimmer.soon())
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key.get_secret_value())
    install_oip(app)  # /v2 (Open Inference Protocol): its routes, and its error form outside the checks above
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    return app
