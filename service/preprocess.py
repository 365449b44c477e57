"""POST /preprocess: images -> the pixels a model sees, after conversion, resizing, invert and binarization.

No model runs. The web page shows a drawing or an uploaded file as the model will see it, and then sends
exactly these pixels to /encode and /log-likelihood as JSON; any client can use it the same way. The
conversion is the one /encode and /log-likelihood apply (service/inputs.py `read_images`), so the pixels
answered here are the pixels those endpoints evaluate for the same file: nothing is computed twice.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.context import resolve_model
from service.endpoint import Endpoints
from service.inputs import read_images
from service.numerics import binarize
from service.openapi import IMAGE_BODY
from service.schemas import ImageInfo, Invert, ModelQuery
from service.settings import Settings


class PreprocessQuery(ModelQuery):
    invert: Invert = False
    binarize: bool = Field(True, description="Bernoulli models: threshold at 0.5 as /log-likelihood does (each "
                           "intensity >= 0.5 becomes 1, the rest 0); ignored for Gaussian models")


class PreprocessResult(ImageInfo):
    x: list[list[float]] | list[list[list[float]]] = Field(
        ..., description="the model's input: H x W intensities (H x W x 3 for colour models) in [0, 1], ink = 1; "
        "send it back as a JSON image to /encode or /log-likelihood to evaluate exactly these pixels")


class PreprocessResponse(BaseModel):
    model: str
    image_shape: list[int]
    channels: int
    likelihood: str
    inverted: bool
    binarized: bool = Field(..., description="whether x was thresholded (Bernoulli models with binarize=true)")
    results: list[PreprocessResult]


endpoints = Endpoints()


@endpoints.post("/preprocess", query=PreprocessQuery, body=IMAGE_BODY, response=PreprocessResponse,
                errors=(400, 404, 413, 415, 422, 503), summary="images -> the pixels the model sees")
async def preprocess(request: Request, q: PreprocessQuery) -> Response:
    """The pixels the model sees for each image: converted to its channels, resized to its image_shape,
    inverted on request and, for Bernoulli models (binarize=true, the default), thresholded at 0.5 as
    /log-likelihood evaluates them. Images as for /encode (file parts named `images`, or JSON)."""
    model = resolve_model(request, q.model)
    settings: Settings = request.app.state.settings
    card = model.card
    prepared = await read_images(request, settings, model, q.invert)
    request.state.batch_size = len(prepared)
    binarized = card.likelihood == "bernoulli" and q.binarize
    results = []
    for p in prepared:
        x = p.x.reshape(card.pixel_shape)
        results.append({"source": p.source, "original_shape": list(p.original_shape), "resized": p.resized,
                        "x": binarize(x) if binarized else x})
    content = {"model": model.name, "image_shape": list(card.image_shape), "channels": card.channels,
               "likelihood": card.likelihood, "inverted": q.invert, "binarized": binarized, "results": results}
    return await request.app.state.runtime.offload.json(content, len(prepared) * card.data_dim)
