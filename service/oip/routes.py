"""The /v2 routes: health, server and model metadata, model readiness, inference, the repository index (and its
load and unload: service/oip/repository.py).

Plain Starlette routes (the handler takes the request and returns a Response): no dependency solving per
request, and no entry in the service's OpenAPI schema, whose errors are problem+json; /v2 follows the
Open Inference Protocol's own specification instead. Errors raised here are ProblemErrors like everywhere
else; service/errors.py answers them in the protocol's form, as every error on /v2.

The infer routes are plain ASGI apps (`InferEndpoint`) that answer their own errors: the inference lane
(service/lane.py) calls them straight from the service's middlewares, without Starlette's request/response
wrapper, its exception layer or the walk through the other routes.

Inference runs through the same admission budget and micro-batcher as the native endpoints
(service/inference.py): an OIP request and a native one to the same graph merge into one ONNX Runtime call.
"""

from __future__ import annotations

import logging

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from service import inference as infer
from service import postprocess as post
from service.errors import DOMAIN_ERRORS, BodyTooLargeError, ProblemError, answer, problem_for
from service.inputs import INLINE_JSON_BYTES, offload
from service.oip import models, repository, tensors
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger("service.oip")
SERVER_NAME = "latentserve"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_JSON_TYPE = (b"content-type", b"application/json")
_BINARY_TYPE = (b"content-type", b"application/octet-stream")


def _json(content: dict | list, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


async def server_metadata(request: Request) -> Response:
    return _json({"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS})


async def live(request: Request) -> Response:
    return _json({"live": True})


async def ready(request: Request) -> Response:
    if request.app.state.draining:  # set by service/server.py on SIGTERM
        raise ProblemError(503, "Not ready", "the server is shutting down", slug="not-ready",
                           headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    if (err := models.not_ready(request)) is not None:
        raise err
    if missing := request.app.state.runtime.registry.missing_required():  # as GET /ready
        raise ProblemError(503, "Not ready", f"required models not loaded yet: {', '.join(missing)}",
                           slug="not-ready", headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    return _json({"ready": True})


async def model_metadata(request: Request) -> Response:
    p = request.path_params
    return _json(models.resolve(request, p["name"], p.get("version")).metadata())


async def model_ready(request: Request) -> Response:
    p = request.path_params
    graph = models.resolve(request, p["name"], p.get("version"))
    return _json({"name": graph.name, "ready": True})


async def repository_index(request: Request) -> Response:
    if (err := models.not_ready(request)) is not None:
        raise err
    body = await request.body()
    ready_only = False
    if body.strip():
        payload = tensors.parse_json(body, 64)
        ready_only = payload.get("ready") is True
    return _json(models.index(request.app.state.runtime, ready_only))


async def model_infer(request: Request) -> tuple[bytes, int | None]:
    """POST /v2/models/{name}[/versions/{version}]/infer: JSON tensors and the binary tensor data extension.

    Its answer: (the response body, the length of its JSON part when binary outputs follow it, else None)."""
    scope = request.scope
    p = scope["path_params"]
    graph = models.resolve(request, p["name"], p.get("version"))
    app_state = scope["app"].state
    settings: Settings = app_state.settings
    body = await _body(request.receive)
    encoding = header_length = None
    for k, v in scope["headers"]:  # the two headers that shape the body, in one pass
        if k == b"content-encoding":
            encoding = v.decode("latin-1")
        elif k == b"inference-header-content-length":
            header_length = v.decode("latin-1")
    spec = models.spec_of(graph.runner)

    def parse() -> tensors.InferRequest:
        raw = body
        if encoding not in (None, "identity"):
            raw = tensors.decompress(body, encoding.strip().lower(), settings.max_body_bytes)
        header, binary = tensors.split_body(raw, header_length)
        return tensors.read_request(tensors.parse_json(header, settings.max_json_pixels), binary, spec, graph.name,
                              settings.max_images, settings.max_latent_abs)

    if not body.strip():
        raise tensors.bad("the body is empty; expected an inference request: a JSON object with 'inputs'")
    # Parsing holds the GIL, even in a thread; past the inline budget a thread keeps the loop answering between
    # its steps (as for JSON images, service/inputs.py).
    req = parse() if len(body) <= INLINE_JSON_BYTES else await offload(parse)
    scope.setdefault("state", {})["batch_size"] = req.rows  # the access log's (service/middleware.py)
    wanted = [name for name, _ in req.outputs]

    def pick(out: dict) -> dict:  # in the inference thread: only the requested outputs, each finite
        post.check_finite(out, wanted)
        return {name: out[name] for name in wanted}

    try:
        if graph.role == "bound":
            outputs = await _bound(request, graph, req, pick, settings)
        else:
            outputs = await infer.run(request, graph.model, graph.role, req.inputs, pick)
    except post.NonFiniteOutputError as e:
        raise tensors.bad(f"the model's output {e.output!r} is not finite (NaN or infinite) for row {e.row} of the "
                    "batch; check that input (pixels in [0, 1] with light ink on black, latent values near the "
                    "prior N(0, I))") from e
    runtime: Runtime = app_state.runtime
    args = (graph.name, graph.version, req.id, outputs, req.outputs)
    size = sum(a.size for a in outputs.values())
    if size <= runtime.offload.inline_values:  # as Offload.run decides, without its coroutine
        return tensors.response_body(*args)
    return await runtime.offload.run(size, tensors.response_body, *args)


async def _body(receive) -> bytes:
    """The request body, as Request.body() reads it (ClientDisconnect when the client is gone), without its
    generator layers."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _bound(request: Request, graph: models.Graph, req: tensors.InferRequest, pick, settings: Settings) -> dict:
    """The bound graph: its cost is its decoder rows (N x S), and one call is at most bound_chunk_rows of them,
    the most a native /log-likelihood call computes at once (service/bound.py)."""
    n, s = req.inputs["eps"].shape[:2]
    cost = n * s
    if cost > settings.bound_chunk_rows:
        raise ProblemError(413, "Too much work", f"{n} rows x {s} samples = {cost} evaluations in one call; the limit "
                           f"is {settings.bound_chunk_rows} (bound_chunk_rows): split the samples over several "
                           "requests", slug="too-much-work")
    runner = graph.runner
    return await infer.admit(request, graph.model, cost, lambda: runner.run(req.inputs, cost=cost, post=pick))


class InferEndpoint:
    """model_infer as an ASGI app; its errors answered here, in the protocol's form."""

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        try:
            body, json_length = await model_infer(request)
        except ProblemError as e:
            response = answer(e, scope["path"])
        except DOMAIN_ERRORS as e:  # a full queue or work budget, a model not ready: service/errors.py answers
            response = answer(problem_for(e, request.app.state.settings.retry_after_s), scope["path"])
        except ClientDisconnect:  # nobody reads the answer (as service/errors.py answers it)
            response = Response(status_code=499)
        except BodyTooLargeError:  # a streamed body over the limit: the body limit's middleware answers 413
            raise
        except Exception:  # noqa: BLE001 - a bug: logged with its trace, answered 500 in the protocol's form
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            response = answer(ProblemError(500, "Internal Server Error", "an unexpected error occurred; it has been "
                                           "logged", slug="internal-error"), scope["path"])
        else:  # the headers a Response would send, in its order, without building one
            if json_length is None:
                headers = [(b"content-length", str(len(body)).encode()), _JSON_TYPE]
            else:
                headers = [(b"inference-header-content-length", str(json_length).encode()),
                           (b"content-length", str(len(body)).encode()), _BINARY_TYPE]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await response(scope, receive, send)


def _model_routes(suffix: str, endpoint, methods: list[str]) -> list[Route]:
    return [Route(f"/v2/models/{{name}}{suffix}", endpoint, methods=methods),
            Route(f"/v2/models/{{name}}/versions/{{version}}{suffix}", endpoint, methods=methods)]


infer_routes = _model_routes("/infer", InferEndpoint(), ["POST"])
routes = [
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    *repository.routes,  # load and unload (service/registry.py)
    *_model_routes("", model_metadata, ["GET"]),
    *_model_routes("/ready", model_ready, ["GET"]),
]
