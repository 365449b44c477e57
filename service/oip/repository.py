"""The repository extension's load and unload (POST /v2/repository/models/{name}/load and /unload).

They act on a model folder through the registry (service/registry.py), as POST /models/{name}/load and /unload
do (service/routes/control.py: the same API key rule, 403 without one). `name` is a folder's name or one of its OIP
models' (`vae-mnist.encoder` loads or unloads the folder vae-mnist, all its graphs). Triton's load parameters (a
config or files sent with the request) are not supported: a model is loaded from its folder as it is.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import ProblemError
from service.routes import control
from service.runtime import UnknownModelError


def _folder(request: Request, name: str) -> str:
    registry = request.app.state.runtime.registry
    if name in request.app.state.runtime.models or (registry.models_dir / name).is_dir():
        return name
    folder, _, _ = name.rpartition(".")
    return folder or name


async def _no_parameters(request: Request) -> None:
    body = await request.body()
    if not body.strip():
        return
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise ProblemError(400, "Invalid request", "the body must be empty or a JSON object", slug="invalid-request")
    if payload.get("parameters"):
        raise ProblemError(400, "Unsupported parameters", "load parameters (a config or files) are not supported: a "
                           "model is loaded from its folder in the repository as it is", slug="invalid-request")


async def repository_load(request: Request) -> Response:
    registry = control.registry_of(request)
    await _no_parameters(request)
    name = request.path_params["name"]
    await registry.load(_folder(request, name))  # ModelNotFoundError: 404, ModelLoadError: 409 (service/errors.py)
    return Response(b"{}", media_type="application/json")


async def repository_unload(request: Request) -> Response:
    registry = control.registry_of(request)
    await _no_parameters(request)
    name = request.path_params["name"]
    if not await registry.unload(_folder(request, name)):
        raise UnknownModelError(f"model {name[:200]!r} is not loaded")
    return Response(b"{}", media_type="application/json")


routes = [
    Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
    Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
]
