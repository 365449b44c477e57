"""The models resource: the loaded models with their cards, and the folders skipped as broken."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from service.context import RuntimeDep, resolve_model
from service.openapi import error_responses
from service.schemas import ModelDetail, ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, responses=error_responses(401),
            summary="the loaded models with their cards")
async def list_models(runtime: RuntimeDep) -> dict:
    return {
        "default_model": runtime.default_model,
        "models": [dict(m.card.summary(), default=m.name == runtime.default_model)
                   for m in sorted(runtime.models.values(), key=lambda m: m.name)],
        "unavailable": dict(runtime.broken),
    }


@router.get("/models/{name}", response_model=ModelDetail, responses=error_responses(401, 404, 503),
            summary="one model and its full card")
async def get_model_info(request: Request, runtime: RuntimeDep,
                         name: Annotated[str, Path(max_length=200, description="model name")]) -> dict:
    m = resolve_model(request, name)
    return dict(m.card.summary(), default=m.name == runtime.default_model, card=m.card.raw)
