"""What the route handlers read from the app: its settings, its runtime, and the model a request names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.runtime import LoadedModel, NotReadyError, Runtime
from service.settings import Settings


# Dependencies are async although they never await: FastAPI runs a plain `def` dependency in its thread
# pool, one thread hop per dependency per request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def loading_done(request: Request) -> bool:
    """Whether the models' loading has finished (successfully or not)."""
    return request.app.state.loading_task is not None and request.app.state.loading_task.done()


def resolve_model(request: Request, name: str | None) -> LoadedModel:
    """The loaded model called `name` (the default model for None): NotReadyError until the models are
    ready, UnknownModelError for another name (answered 503 and 404: service/errors.py).

    The handlers call this directly instead of declaring it as a dependency (service/endpoint.py says why).
    """
    runtime: Runtime = request.app.state.runtime
    if not runtime.ready:
        raise NotReadyError(runtime.load_error or ("no models are loaded" if runtime.models == {} and
                                                   loading_done(request) else "the models are still loading"))
    name = runtime.default_model if name is None else name  # an empty name names no model (404)
    request.state.model = name
    return runtime.model(name)
