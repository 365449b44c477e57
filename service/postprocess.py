"""What happens to model outputs before they are answered, off the event loop.

Request-dependent numpy work (the planar flow of flow models, the checks below) runs as a request's
`post` function in the inference thread (service/runtime.py GraphRunner.run); encoding a response
(PNG, large JSON) runs in a small bounded pool of its own (`Offload`), so that it neither waits behind
ONNX Runtime calls nor holds the event loop. Work below `inline_values` numbers stays on the loop: a
thread hop costs the loop more than that.

A model output that is not finite (NaN or infinite) would serialise as JSON null and break the
response schema: it is reported instead as a problem that names the input and what to change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import orjson
from fastapi.responses import Response

from model_repository.graphs import FLOW_PARAMS, FLOWED_MEAN, encoder_outputs
from service import images as img
from service.numerics import planar_flow

T = TypeVar("T")
# Numbers a response may hold and still be encoded on the event loop: less work than a thread hop costs it.
INLINE_VALUES = 16384


class NonFiniteOutputError(Exception):
    """Row `row` of output `output` is NaN or infinite."""

    def __init__(self, output: str, row: int):
        super().__init__(f"{output}[{row}] is not finite")
        self.output, self.row = output, row


def check_finite(outputs: dict[str, np.ndarray], names) -> None:
    """NonFiniteOutputError for the first row of any of `names` that holds a NaN or an infinity (outputs the
    batcher found finite in the whole merged call, service/batcher.py `Rows`, are not looked at again)."""
    known = getattr(outputs, "finite", ())
    for name in names:
        if name in known:
            continue
        a = outputs[name]
        if not np.isfinite(a).all():
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            raise NonFiniteOutputError(name, int(np.argmax(bad)))


def finite_post(names: list[str]) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A `post` that only checks that `names` are finite."""

    def post(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_finite(out, names)
        return out

    return post


def encoder_post(flows: bool) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The encoder's `post`: every output finite, and for flow models z_k (the mean through the flows).

    Encoders exported with a `z_k` output (models/README.md) give it; for older ones it is computed here,
    in the inference thread: row by row in numpy it competes with the event loop for the GIL at thousands of
    requests a second, which is why new exports compute it in the graph.
    """
    names = encoder_outputs(flows)

    def post(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if flows and FLOWED_MEAN not in out:
            out[FLOWED_MEAN] = planar_flow(out["mean"], *(out[name] for name in FLOW_PARAMS))
        check_finite(out, names)
        return out

    return post


ENCODER_POST = {False: encoder_post(False), True: encoder_post(True)}  # by "has flows"


def decoder_post(shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The decoder's `post`: x_mean finite, clipped to [0, 1], as [n, *shape] (the card's pixel_shape: H, W
    and, for colour, C)."""

    def post(out: dict[str, np.ndarray]) -> np.ndarray:
        check_finite(out, ["x_mean"])
        return np.clip(out["x_mean"], 0.0, 1.0).reshape(-1, *shape)

    return post


class Offload:
    """A bounded pool for response encoding; small jobs run inline (a thread hop costs more)."""

    def __init__(self, workers: int, inline_values: int):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="post")
        self.inline_values = inline_values

    async def run(self, size: int, fn: Callable[..., T], *args) -> T:
        """fn(*args), in the pool when `size` (numbers it handles) is over the inline budget."""
        if size <= self.inline_values:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def json(self, content: dict, size: int) -> Response:
        """`content` (numpy arrays allowed) as a JSON response; `size`: the numbers in it."""
        body = await self.run(size, dumps, content)
        return Response(body, media_type="application/json")

    async def png(self, images: np.ndarray, scale: int) -> Response:
        body = await self.run(images.size * scale * scale, lambda: img.png_grid(images, scale=scale))
        return Response(body, media_type="image/png")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def json_response(content: dict, status_code: int = 200) -> Response:
    """`content` (numpy arrays allowed) as JSON, encoded here, on the loop (small answers: see `Offload`).

    Returning a Response skips FastAPI's re-validation of the result against the route's response_model.
    """
    return Response(dumps(content), status_code=status_code, media_type="application/json")


def dumps(content: dict) -> bytes:
    """`content` (numpy arrays allowed) as JSON bytes: a float32 array prints each number in its shortest form
    that reads back as the same float32."""
    return orjson.dumps(content, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _json_default(obj):
    if isinstance(obj, np.ndarray):  # orjson serializes C-contiguous arrays only
        return np.ascontiguousarray(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
