"""Explicit model control: POST /models/{name}/load and POST /models/{name}/unload (service/registry.py acts).

They change what every client is served, so they need the API key: with LATENTSERVE_API_KEY set, a request
without it is refused before it gets here (401, service/middleware.py); a service without a key answers them
403 and leaves them out of its OpenAPI schema (nothing a client can call). A model unloaded here stays
unloaded, whatever the repository polls find, until it is loaded here again.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from service.runtime import ModelControlOffError, NotReadyError, UnknownModelError
from service.schemas import Problem

_RESPONSES = {code: {"model": Problem, "description": text} for code, text in {
    401: "API key missing or wrong",
    403: "the service has no API key: model control is off",
    404: "no such model folder (load) or no such loaded model (unload)",
    409: "the folder failed to load; the version loaded before, if any, goes on serving",
    503: "the models are still loading",
}.items()}

Name = Annotated[str, Path(max_length=200, description="model name (its folder's name in the repository)")]


class ModelControl(BaseModel):
    name: str
    state: Literal["READY", "UNLOADED"] = Field(..., description="READY: served (the folder's current version); "
                                                "UNLOADED: not served until loaded again")
    default_model: str | None = Field(..., description="the model used when a request names none, after the change")


def registry_of(request: Request):
    """The registry, when model control is on (an API key) and the models are loaded; else 403 or 503
    (domain errors, answered by service/errors.py)."""
    if request.app.state.settings.api_key is None:
        raise ModelControlOffError("loading and unloading models needs an API key: start the service with "
                                   "LATENTSERVE_API_KEY set, and send it in X-API-Key")
    registry = request.app.state.runtime.registry
    if not registry.started:
        raise NotReadyError("the models are still loading")
    return registry


async def load_model(request: Request, name: Name) -> dict:
    """Load `name` from the repository's folder of that name, or load it again when it is served: the new
    version replaces the old one atomically (requests in flight finish on the version they started with).
    A folder that fails leaves the version loaded before, if any, serving; GET /models lists the failure."""
    registry = registry_of(request)
    await registry.load(name)  # ModelNotFoundError: 404, ModelLoadError: 409
    return {"name": name, "state": "READY", "default_model": registry.runtime.default_model}


async def unload_model(request: Request, name: Name) -> dict:
    """Stop serving `name`: new requests for it get 404, requests in flight finish. The repository polls leave
    it unloaded until POST /models/{name}/load."""
    registry = registry_of(request)
    if not await registry.unload(name):
        raise UnknownModelError(f"model {name!r} is not loaded")
    return {"name": name, "state": "UNLOADED", "default_model": registry.runtime.default_model}


def router(settings) -> APIRouter:
    """The two routes, in the OpenAPI schema only when the service has an API key."""
    r = APIRouter(include_in_schema=settings.api_key is not None, tags=["models"])
    r.add_api_route("/models/{name}/load", load_model, methods=["POST"], response_model=ModelControl,
                    responses=_RESPONSES, summary="load a model from its folder now, or reload it (needs the API key)")
    r.add_api_route("/models/{name}/unload", unload_model, methods=["POST"], response_model=ModelControl,
                    responses=_RESPONSES, summary="stop serving a model until it is loaded again (needs the API key)")
    return r
