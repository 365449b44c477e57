"""schemathesis hooks for latentserve: what the OpenAPI schema states but JSON Schema cannot express.

schemathesis.toml (at the repository root) names this module (`tests.schemathesis_hooks`, imported with
the working directory on sys.path); run `st` from the repository root:

    st run http://127.0.0.1:8000/openapi.json --checks all

The schema declares every limit JSON Schema can state (service/openapi.py). The constraints below
cannot be stated in it, so a request generated from the schema alone may break them and be refused for a
good reason (ST202 "schema-valid request rejected"). Each hook makes the schema-valid (positive) cases
meet one of them, and nothing else: negative cases are left as generated, so the server's refusals are
still checked, and no expected status is widened to hide a rejection.

- An image file part (`format: binary`) must hold the bytes of an image in a format Pillow decodes:
  JSON Schema describes a string's bytes, not what they decode to. The `binary` format's strategy
  (schemathesis.openapi.format) gives real image files instead of arbitrary bytes: up to 40 x 40 pixels,
  in every accepted format (PNG, JPEG, BMP, GIF, TIFF, WebP) and a range of modes.
- A JSON image given as rows must be rectangular (every row of one length), and a flat one must hold
  exactly the D values of the model named by the `model` query parameter: JSON Schema cannot say that
  the items of an array have equal lengths, nor tie a body's length to a query parameter.
- A latent code of /decode holds exactly latent_dim numbers of the model named by the query parameter.
- The JSON images of one request hold at most max_json_pixels values in all: a bound on a sum over items.
- POST /log-likelihood: images x samples (query) is bounded; a PNG answer (/sample, /decode) is bounded
  in pixels, a product of n or the number of codes and `scale`: products of a query parameter and another
  parameter or the body.

The models' sizes and these limits come from the schema's own `x-latentserve` extension (written from
the live Settings and the loaded models), so the hooks follow any configuration of the server.
"""

from __future__ import annotations

import io
import math

import schemathesis
from hypothesis import strategies as st
from PIL import Image

from service.images import grid_shape  # the PNG grid's layout (importable: st runs from the repository root)

# (mode, format) of the image files sent: every accepted format, and the modes the service converts
# (colour, alpha, palette, 16- and 32-bit integer, float)
KINDS = (("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("L", "JPEG"), ("RGB", "BMP"), ("P", "GIF"),
         ("I", "TIFF"), ("F", "TIFF"), ("L", "WEBP"))


def image_files() -> st.SearchStrategy[bytes]:
    """Real image files of any size up to 40 x 40, in every accepted format and a range of modes."""
    sizes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 255))
    return st.tuples(sizes, st.sampled_from(KINDS)).map(_image_file)


def _image_file(args) -> bytes:
    (h, w, value), (mode, fmt) = args
    buf = io.BytesIO()
    Image.new("L", (w, h), value).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


schemathesis.openapi.format("binary", image_files())


@schemathesis.hook
def map_case(context, case):
    """Make a schema-valid case meet the constraints JSON Schema cannot state (see the module docstring)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return case
    ext = case.operation.schema.raw_schema.get("x-latentserve")
    if ext is None:
        return case
    # Edits go to copies, set on the case only when they differ: cases may share the generated containers, and
    # schemathesis revalidates a changed container (a changed multipart body, which holds binary parts, it
    # cannot validate, and so would take the case for a negative one).
    query = dict(case.query) if isinstance(case.query, dict) else {}
    body = dict(case.body) if isinstance(case.body, dict) else case.body
    model = ext["models"].get(query.get("model") or ext["default_model"])
    limits = ext["limits"]
    path = case.operation.path
    images_body = isinstance(body, dict) and isinstance(body.get("images"), list)
    if path in ("/encode", "/log-likelihood", "/preprocess") and images_body:
        if case.media_type != "multipart/form-data" and model is not None:
            body["images"] = _json_images(body["images"], model["data_dim"], limits["max_json_pixels"])
        if path == "/log-likelihood":
            _bound_work(query, len(body["images"]), limits)
    if path == "/decode" and model is not None and isinstance(body, dict) and isinstance(body.get("z"), list):
        d = model["latent_dim"]
        body["z"] = [(list(z) + [0.0] * d)[:d] for z in body["z"]]
        _bound_png(query, len(body["z"]), 1, model, limits)
    if path == "/sample" and model is not None:
        _bound_png(query, _int(query.get("n")) or 16, 4, model, limits)
    if query != (case.query or {}):
        case.query = query
    if body != case.body:
        case.body = body
    return case


@schemathesis.hook
def before_add_examples(context, examples):
    """The Examples phase runs no map_case hook: the same constraints for the cases built from the schema's
    examples (an example combined with another parameter's example may break them)."""
    examples[:] = [map_case(context, case) for case in examples]


def _int(value) -> int | None:
    """A query parameter's integer value (the coverage phase also sends integers as their strings)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _json_images(images: list, data_dim: int, max_values: int) -> list:
    """Rows cut or padded (with 0) to the first row's length, flat images to exactly data_dim values; at most
    max_values values in all (the first image cut to fit, the images beyond the budget dropped)."""
    out, budget = [], max_values
    for image in images:
        if image and isinstance(image[0], list):
            width = min(len(image[0]), budget)
            image = [(row + [0.0] * width)[:width] for row in image[:budget // max(width, 1)]]
            size = width * len(image)
        else:
            image, size = (image + [0.0] * data_dim)[:data_dim], data_dim
        if size == 0 or size > budget:
            break
        out.append(image)
        budget -= size
    return out


def _bound_work(query: dict, images: int, limits: dict) -> None:
    """POST /log-likelihood: images x samples within the limit (the samples lowered when needed)."""
    samples = _int(query.get("samples")) or limits["default_importance_samples"]
    if images * samples > limits["log_likelihood_work"]:
        query["samples"] = max(1, limits["log_likelihood_work"] // images)


def _bound_png(query: dict, n: int, default_scale: int, model: dict, limits: dict) -> None:
    """A PNG answer of n images within max_response_pixels (its scale lowered when needed)."""
    if query.get("format") == "json" or n < 1:
        return
    height, width = grid_shape(n, *model["image_shape"])
    pixels = height * width
    scale = _int(query.get("scale")) or default_scale
    if pixels * scale * scale > limits["max_response_pixels"]:
        query["scale"] = max(1, math.isqrt(limits["max_response_pixels"] // pixels))

