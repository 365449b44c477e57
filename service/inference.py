"""The inference handlers' shared steps after their inputs are read: admission, running a graph, responses.

`run` and `admit` hold the request's work under the shared budget (service/admission.py; a full budget
or queue is answered 429 by service/errors.py); `image_response` answers images as PNG or JSON, encoded
off the event loop when large (service/postprocess.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from service import images as img
from service import postprocess as post
from service.admission import cancelled_on_disconnect
from service.errors import ProblemError
from service.runtime import LoadedModel, Runtime
from service.settings import Settings


def wants_png(request: Request, fmt: str | None, default: str) -> bool:
    if fmt is not None:
        return fmt == "png"
    accept = request.headers.get("accept", "")
    if "image/png" in accept or "image/*" in accept:
        return True
    if "application/json" in accept:
        return False
    return default == "png"


def png_checked(request: Request, model: LoadedModel, fmt: str | None, default: str, n: int, scale: int,
                 settings: Settings) -> bool:
    """Whether the answer is a PNG; 422/413 before any work when its scale or size is over the limits."""
    png = wants_png(request, fmt, default)
    if png:
        if scale > settings.max_png_scale:
            raise ProblemError(422, "Invalid scale", f"scale must be <= {settings.max_png_scale}, got {scale}",
                               slug="invalid-parameter")
        check_png_size(n, model.card.image_shape, scale, settings.max_response_pixels)
    return png


def check_png_size(n: int, shape: tuple[int, int], scale: int, max_pixels: int) -> None:
    """413 before any work when the PNG of `n` images at `scale` would have more than `max_pixels` pixels."""
    h, w = img.grid_shape(n, *shape)
    pixels = h * w * scale * scale
    if pixels > max_pixels:
        raise ProblemError(413, "Response image too large", f"a PNG of {n} images at scale {scale} would be "
                           f"{w * scale} x {h * scale} = {pixels} pixels; the limit is {max_pixels}: ask for fewer "
                           "images, a smaller scale, or format=json", slug="response-too-large")


async def image_response(request: Request, model: LoadedModel, x: np.ndarray, png: bool, scale: int,
                          extra: dict | None = None) -> Response:
    """Images `x` [n, H, W] (or [n, H, W, 3]) in [0, 1] as a PNG (one image or a grid; RGB for colour) or JSON,
    encoded off the loop when large."""
    offload: post.Offload = request.app.state.runtime.offload
    if png:
        return await offload.png(x, scale)
    return await offload.json({"model": model.name, "image_shape": list(model.card.image_shape),
                               "channels": model.card.channels, "images": x, **(extra or {})}, x.size)


async def admit(request: Request, model: LoadedModel, cost: int, work: Callable[[], Awaitable]):
    """`work()` admitted under the shared work budget (service/admission.py)."""
    runtime: Runtime = request.app.state.runtime
    settings: Settings = request.app.state.settings
    runtime.budget.acquire(cost, model.name)
    try:
        if cost <= settings.max_batch_size:  # not worth a watcher task: see service/admission.py
            return await work()
        return await cancelled_on_disconnect(request, work)
    finally:
        runtime.budget.release(cost)
        runtime.trimmer.after(cost)


async def run(request: Request, model: LoadedModel, role: str, inputs: dict[str, np.ndarray], post_fn=None):
    """`role`'s outputs for `inputs` (or post_fn(outputs), computed in the inference thread), admitted.

    `admit` written out for the common case: each coroutine layer costs the event loop on every request.
    """
    runner = model.runners[role]
    cost = runner.padded_rows(len(next(iter(inputs.values()))))
    runtime: Runtime = request.app.state.runtime
    settings: Settings = request.app.state.settings
    if cost > settings.max_batch_size:
        return await admit(request, model, cost, lambda: runner.run(inputs, post=post_fn))
    runtime.budget.acquire(cost, model.name)
    try:
        return await runner.run(inputs, post=post_fn)
    finally:
        runtime.budget.release(cost)
