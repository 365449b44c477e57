"""Reading requests: the bytes a client sends -> validated query models and float32 images for the models.

Every malformed input is a ProblemError (4xx problem+json), whatever its depth, size, encoding or number
syntax. JSON is parsed by orjson: it refuses nesting deeper than 1024 levels, numbers beyond float range
and lone surrogates with a JSONDecodeError, which the Python parser answered with RecursionError,
ValueError (numbers of more than 4300 digits) or an OverflowError later.

Work on the event loop is bounded: every limit that can be checked from a count (images, rows, values,
declared pixels) is checked before the work it bounds, and decoding or converting more than
INLINE_PIXELS pixels runs in a worker thread (`offload`). Image files declare their size in their headers
(a PNG's IHDR, read here; any other format through Pillow's lazy open, in the worker), so the per-request
budget of decoded pixels (Settings.max_request_pixels) is enforced before a pixel is decoded.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from service import images as img
from service import multipart
from service.errors import ProblemError, invalid_request
from service.schemas import ImagesJSON
from service.settings import Settings

Q = TypeVar("Q", bound=BaseModel)
T = TypeVar("T")

# Decoded pixels a request may cost on the event loop: 64 images of 32 x 32 (a full request of MNIST digits,
# 50,176 pixels, stays inline; about half a millisecond of decoding). Beyond it the work runs in a thread.
INLINE_PIXELS = 64 * 32 * 32
# A JSON image body is parsed inline up to this size: every JSON value takes two bytes at least (a digit
# and a comma), so such a body holds at most INLINE_PIXELS pixels.
INLINE_JSON_BYTES = 2 * INLINE_PIXELS

# Query parameters whose upper bound is a setting (parameter -> setting), checked by `read_query` and
# written into the OpenAPI schema by service/api_schema.py, so that both say the live value.
QUERY_LIMITS = {"n": "max_samples", "samples": "max_importance_samples", "temperature": "max_temperature",
                "scale": "max_png_scale"}


async def offload(fn: Callable[[], T]) -> T:
    """Run `fn` in a worker thread (request-dependent CPU work beyond the inline budget)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn)


# ------------------------------------------------------------------------------------------------
# Query strings
# ------------------------------------------------------------------------------------------------


def read_query(request: Request, params: type[Q]) -> Q:
    """The request's query string validated by `params` (service/schemas.py); 422 naming the parameter.

    The inference endpoints read their query parameters with this instead of declaring each one as a
    FastAPI parameter: FastAPI's per-parameter solving cost about a sixth of POST /encode's time on the
    event loop, more than one pydantic validation of the whole query (docs/benchmarks.md). The routes
    declare the same parameters in OpenAPI (service/api_schema.py), so /docs and schemathesis see them
    with the limits of the live Settings.
    """
    # What request.query_params holds (Starlette parses the same way), without building its multi-dict;
    # a repeated name keeps its last value, as there.
    query = dict(parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True))
    try:
        q = params.model_validate(query)
    except ValidationError as e:
        raise invalid_request(e.errors(include_url=False), where=("query",)) from e
    settings: Settings = request.app.state.settings
    for name, setting in _query_limits(params):
        value, limit = getattr(q, name), getattr(settings, setting)
        if value is not None and value > limit:
            raise invalid_request([{"loc": (name,), "msg": f"Input should be less than or equal to {limit:g} "
                                    f"(the service's {setting})", "type": "less_than_equal"}], where=("query",))
    return q


@functools.cache
def _query_limits(params: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    # Per query model, once: getattr on a pydantic model for a field it lacks costs microseconds per request
    return tuple((name, setting) for name, setting in QUERY_LIMITS.items() if name in params.model_fields)


# ------------------------------------------------------------------------------------------------
# Images: multipart uploads and JSON arrays
# ------------------------------------------------------------------------------------------------


async def read_images(request: Request, settings: Settings, model, invert: bool) -> list[img.PreparedImage]:
    """The request's images (multipart parts named `images`, or JSON) prepared for `model`."""
    ctype = _media_type(request)
    shape, channels = model.card.image_shape, model.card.channels
    if ctype == "multipart/form-data":
        blobs = _image_parts(await request.body(), request.headers["content-type"], settings)

        def decode_all(pixels: list) -> list[img.PreparedImage]:
            """Prepare every image, decoding those not decoded yet (None in `pixels`)."""
            out = []
            for p, (data, name) in zip(pixels, blobs, strict=True):
                if p is None:
                    p = img.decode_image(data, name, max_pixels=settings.max_image_pixels, channels=channels)
                out.append(img.prepare(p, shape, invert=invert, source=name, channels=channels))
            return out

        sizes = [img.png_size(data) for data, _ in blobs]
        if None not in sizes:  # PNGs: their sizes are known here, from their IHDR
            pixels = [None] * len(blobs)
            if _check_pixels(sizes, [name for _, name in blobs], settings) <= INLINE_PIXELS:
                # On the loop only what the fast path decodes: its cost is bounded by the declared size
                pixels = [img.decode_plain_png(data, max_pixels=settings.max_image_pixels) for data, _ in blobs]
                if all(p is not None for p in pixels):
                    return decode_all(pixels)
            return await offload(lambda: decode_all(pixels))

        def size_and_decode_all() -> list[img.PreparedImage]:
            declared = [img.declared_size(data, name, max_pixels=settings.max_image_pixels) for data, name in blobs]
            _check_pixels(declared, [name for _, name in blobs], settings)
            return decode_all([None] * len(blobs))

        return await offload(size_and_decode_all)
    if _is_json(ctype):
        # Every value but the first follows a comma: counted as the body arrives, so that a body with too many
        # values is refused after the first chunk past the limit, neither stored whole nor scanned with the GIL
        # held (uvicorn discards the rest of a body whose request has been answered).
        body = await _read_counted(request, [(b",", settings.max_json_pixels - 1, lambda: ProblemError(
            413, "Too many pixels", f"the JSON body holds more than {settings.max_json_pixels} values, the limit of "
            "pixels per request in JSON images; send large images as files (PNG), which cost less to read",
            slug="too-many-pixels"))])

        def parse_all() -> list[img.PreparedImage]:
            return _json_images(body, ctype, settings, shape, channels, invert)

        return parse_all() if len(body) <= INLINE_JSON_BYTES else await offload(parse_all)
    raise ProblemError(415, "Unsupported media type", f"Content-Type {ctype or '(none)'!r} is not accepted; send "
                       "multipart/form-data with file parts named 'images', or application/json "
                       '{"images": [...]}', slug="unsupported-media-type")


IMAGES_EXPECTED = ('{"images": [image, ...]} with each image an H x W array (H x W x 3 for colour models) or a flat '
                   "array of D numbers (intensities in [0, 1]), or a multipart upload")


def _json_images(body: bytes, ctype: str, settings: Settings, shape: tuple[int, int], channels: int, invert: bool
                 ) -> list[img.PreparedImage]:
    # The body holds at most max_json_pixels values (read_images counted them): parsing holds the GIL, even in a
    # worker thread, and the count bounds how long (about 1.5 MB of JSON at the default max_json_pixels).
    payload = parse_json(body, ctype, IMAGES_EXPECTED)
    if isinstance(payload, dict) and isinstance(payload.get("images"), list):
        _check_count(len(payload["images"]), settings)  # before validating thousands of images
    parsed = _validated(ImagesJSON, payload, IMAGES_EXPECTED)
    sizes = [img.json_image_size(values, shape, i, channels) for i, values in enumerate(parsed.images)]
    _check_pixels([(w, h) for h, w in sizes], [f"images[{i}]" for i in range(len(sizes))], settings)
    return [img.prepare(img.json_image(values, shape, i, channels), shape, invert=invert, source=f"images[{i}]",
                        channels=channels) for i, values in enumerate(parsed.images)]


def _check_pixels(sizes: list[tuple[int, int]], names: list[str], settings: Settings) -> int:
    """Total declared pixels of (width, height) `sizes`; 413 beyond the per-image or per-request limit."""
    total = 0
    for (width, height), name in zip(sizes, names, strict=True):
        if width < 1 or height < 1:
            raise ProblemError(422, "Invalid image", f"{name}: declared size {width}x{height}", slug="invalid-image")
        if width * height > settings.max_image_pixels:
            raise ProblemError(413, "Image too large", f"{name}: declares {width}x{height} = {width * height} "
                               f"pixels, more than the limit of {settings.max_image_pixels} (refused before "
                               "decoding)", slug="image-too-large")
        total += width * height
    if total > settings.max_request_pixels:
        raise ProblemError(413, "Too many pixels", f"the {len(sizes)} images declare {total} pixels in all, more "
                           f"than the limit of {settings.max_request_pixels} per request (refused before decoding)",
                           slug="too-many-pixels")
    return total


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _image_parts(body: bytes, content_type: str, settings: Settings) -> list[tuple[bytes, str]]:
    """(file bytes, file name) of the parts named `images` of a multipart body."""
    try:
        parts = multipart.parse(body, multipart.boundary(content_type), max_parts=settings.max_images + 16)
    except multipart.TooManyPartsError as e:
        raise ProblemError(413, "Too many images", f"{e}; the limit is {settings.max_images} images per request",
                           slug="too-many-images") from e
    except multipart.MultipartError as e:
        raise ProblemError(400, "Malformed multipart body", f"{e}; expected multipart/form-data; boundary=... "
                           "with file parts named 'images'", slug="malformed-multipart") from e
    images = [p for p in parts if p.name == "images"]
    if not images:
        names = sorted({p.name or "(unnamed)" for p in parts})
        raise ProblemError(422, "No images", f"expected file parts named 'images', got parts {names}",
                           slug="no-images")
    _check_count(len(images), settings)
    for i, p in enumerate(images):
        if p.filename is None:
            raise ProblemError(422, "Not a file", f"part images[{i}] is a text field; send each image as a file "
                               "part (Content-Disposition with a filename)", slug="not-a-file")
    return [(p.data, p.filename or f"images[{i}]") for i, p in enumerate(images)]


def _check_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise ProblemError(422, "Empty request", "no images in the request (expected at least one)",
                           slug="empty-request")
    if n > settings.max_images:
        raise ProblemError(413, "Too many images", f"{n} images in one request; the limit is "
                           f"{settings.max_images}", slug="too-many-images")


# ------------------------------------------------------------------------------------------------
# JSON bodies
# ------------------------------------------------------------------------------------------------


async def read_json(request: Request, schema: type[Q], expected: str, *, max_arrays: int | None = None,
                    max_values: int | None = None) -> Q:
    """The JSON body validated by `schema`: 422 saying `expected` when empty or invalid, 415 when not JSON.

    `max_arrays` and `max_values` bound the arrays and the values (numbers) a valid body can hold: a body
    with more is refused (413) from a count of its brackets and commas, before it is parsed into Python
    objects (millions of tiny rows would cost seconds and hundreds of MB).
    """
    limits = []
    if max_arrays is not None:  # a valid body holds no strings but its keys: every '[' opens an array
        limits.append((b"[", max_arrays, lambda: ProblemError(
            413, "Too many values", f"the body holds more than {max_arrays} arrays; expected {expected}",
            slug="too-many-values")))
    if max_values is not None:  # ... and every ',' separates two members
        limits.append((b",", max_values + (max_arrays or 0), lambda: ProblemError(
            413, "Too many values", f"the body holds more than {max_values} values; expected {expected}",
            slug="too-many-values")))
    body = await _read_counted(request, limits)
    return _validated(schema, parse_json(body, _media_type(request), expected), expected)


def parse_json(body: bytes, ctype: str, expected: str):
    """A JSON body -> Python objects; 422 when empty or malformed (any depth, size or number), 415 when not JSON."""
    if not body.strip():
        raise ProblemError(422, "Empty request", f"the body is empty; expected {expected}", slug="empty-request")
    if not _is_json(ctype):
        raise ProblemError(415, "Unsupported media type", f"Content-Type {ctype or '(none)'!r} is not accepted; "
                           f"send application/json: {expected}", slug="unsupported-media-type")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProblemError(422, "Malformed JSON", f"the body is not valid JSON ({e}); expected UTF-8 JSON, nested "
                           f"at most 1024 levels, numbers within float range: {expected}",
                           slug="malformed-json") from e


async def _read_counted(request: Request, limits: list[tuple[bytes, int, Callable[[], ProblemError]]]) -> bytes:
    """The body; the problem of the first (character, most, problem) in `limits` whose character it holds more
    than `most` times, raised at the chunk that passes the limit (each chunk is scanned once, on arrival)."""
    chunks, seen = [], [0] * len(limits)
    async for chunk in request.stream():
        for i, (char, most, problem) in enumerate(limits):
            seen[i] += chunk.count(char)
            if seen[i] > most:
                raise problem()
        chunks.append(chunk)
    return b"".join(chunks)


def _validated(schema: type[Q], payload, expected: str) -> Q:
    try:
        return schema.model_validate(payload)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])[:200] or "body"  # a location may quote a client's key
        raise ProblemError(422, "Invalid request", f"{where}: {first['msg']}; expected {expected}",
                           slug="invalid-request") from e
