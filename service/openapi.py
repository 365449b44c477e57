"""The OpenAPI schema: FastAPI's, plus what it cannot know.

- problem+json (service/errors.py) for every error response, with Retry-After on 429 and 503;
- the query parameters and request bodies of the inference endpoints, whose handlers read them
  themselves (service/endpoint.py, service/inputs.py);
- the API key's security schemes when one is set;
- the limits of the live Settings and of the loaded models (`openapi_limits`), so that the schema says
  exactly what is accepted.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service import bound
from service.errors import PROBLEM_MEDIA_TYPE
from service.inputs import QUERY_LIMITS
from service.schemas import DecodeRequest, ImagesJSON, Problem
from service.settings import Settings

ERROR_DESCRIPTIONS = {
    400: "Malformed request (multipart syntax, Content-Length)",
    401: "API key missing or wrong (when the service has one)",
    404: "Unknown model",
    413: "Body, image, request or response image too large",
    415: "Unsupported media type (request body or image format)",
    422: "Invalid input: says what was expected",
    429: "Busy (work budget or queue full): retry after the Retry-After header's seconds",
    503: "Models not loaded yet",
}


def error_responses(*codes: int) -> dict:
    """`responses` of a route that may answer these error statuses (problem+json: see `openapi`)."""
    return {c: {"model": Problem, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


PNG_RESPONSE = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["images"], "properties": {"images": {
                    "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                    "description": "image files (PNG, JPEG, BMP, GIF, TIFF, WebP); one part per image. Each "
                                   "file may declare at most max_image_pixels pixels (width x height), all "
                                   "together at most max_request_pixels; see the limits in the description"}}},
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/ImagesJSON"}},
        },
    }
}


def query_openapi(params: type[BaseModel], **extra) -> dict:
    """`openapi_extra` of a route whose handler reads its query with `read_query(request, params)`."""
    schema = params.model_json_schema()
    parameters = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        parameters.append({"name": name, "in": "query", "required": name in schema.get("required", ()),
                           "description": prop.pop("description", ""), "schema": prop})
    return {"parameters": parameters, **extra}


DECODE_BODY = {
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DecodeRequest"}}}}
}
# Bodies the handlers read themselves (read_json): their schemas go into the OpenAPI components by hand.
_BODY_SCHEMAS = (ImagesJSON, DecodeRequest)


def openapi(app: FastAPI) -> dict:
    """The app's schema (`app.openapi`), cached once the models are loaded (it states their sizes)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for body in _BODY_SCHEMAS:
        extra = body.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(extra.pop("$defs", {}))
        comps[body.__name__] = extra
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            for code, resp in op.get("responses", {}).items():
                if code.isdigit() and int(code) >= 400:
                    resp["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
                    if code in ("429", "503"):
                        resp["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds"}}
    if app.state.settings.api_key is not None:
        schema["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        schema["security"] = [{"apiKey": []}, {"bearer": []}]
    runtime = app.state.runtime
    openapi_limits(schema, app.state.settings, list(runtime.models.values()) if runtime.ready else None,
                   runtime.default_model)
    if runtime.ready:
        app.openapi_schema = schema
    return schema


def openapi_limits(schema: dict, settings: Settings, models: list | None = None,
                   default_model: str | None = None) -> dict:
    """Write the live Settings' limits into an OpenAPI schema (in place; returned): the query parameters'
    maxima (QUERY_LIMITS), images and codes per request, and the limits' values in the API description.

    With the loaded `models`, also what depends on them: the `model` query parameter is one of their
    names, a flat JSON image holds D values and a latent code latent_dim values, D and latent_dim of the
    model named (bounded here by the smallest and largest loaded; exact when the models agree), and the
    nested image layouts are those of the loaded models' channels.

    What JSON Schema cannot state (a length that depends on the `model` parameter, a product of a query
    parameter and the body's length) is written as data in the `x-latentserve` extension: the loaded
    models' sizes and the limits on such products, for clients and for the schemathesis hooks
    (tests/schemathesis_hooks.py) to read.
    """
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            for param in op.get("parameters", ()) if isinstance(op, dict) else ():
                setting = QUERY_LIMITS.get(param.get("name")) if param.get("in") == "query" else None
                if setting is not None:
                    _set_maximum(param["schema"], getattr(settings, setting))
                if models and param.get("in") == "query" and param.get("name") == "model":
                    for s in param["schema"].get("anyOf", [param["schema"]]):
                        if s.get("type") == "string":
                            s["enum"] = sorted(m.name for m in models)
                    param["schema"]["examples"] = [default_model or sorted(m.name for m in models)[0]]
            content = op.get("requestBody", {}).get("content", {}) if isinstance(op, dict) else {}
            form = content.get("multipart/form-data", {}).get("schema", {}).get("properties", {}).get("images")
            if form is not None:
                form["maxItems"] = settings.max_images
    comps = schema.get("components", {}).get("schemas", {})
    if "ImagesJSON" in comps:
        images = comps["ImagesJSON"]["properties"]["images"]
        images["maxItems"] = settings.max_images
        flat, rows, rgb_rows = images["items"]["oneOf"]
        side = min(settings.max_image_pixels, settings.max_json_pixels)
        flat["maxItems"] = rows["maxItems"] = rows["items"]["maxItems"] = side
        rgb_rows["maxItems"] = rgb_rows["items"]["maxItems"] = side
        if models:
            dims = [m.card.data_dim for m in models]
            flat["minItems"], flat["maxItems"] = min(dims), max(dims)
            # the nested layouts of the loaded models only: H x W (grayscale), H x W x 3 (colour)
            channels = {m.card.channels for m in models}
            images["items"]["oneOf"] = [flat, *([rows] if 1 in channels else []),
                                        *([rgb_rows] if 3 in channels else [])]
    if "DecodeRequest" in comps:
        z = comps["DecodeRequest"]["properties"]["z"]
        z["maxItems"] = settings.max_images
        z["items"]["items"].update(minimum=-settings.max_latent_abs, maximum=settings.max_latent_abs)
        if models:
            dims = [m.card.latent_dim for m in models]
            z["items"]["minItems"], z["items"]["maxItems"] = min(dims), max(dims)
            default = next((m for m in models if m.name == default_model), None)
            if default is not None:  # the example is a code of the default model (no `model` parameter)
                comps["DecodeRequest"]["examples"] = [{"z": [[0.0] * default.card.latent_dim]}]
    work = bound.max_work(settings)
    schema["info"]["description"] = schema["info"].get("description", "") + (
        f"\n\nLimits of this service: {settings.max_body_bytes} bytes per request body; {settings.max_images} "
        f"images or latent codes per request; {settings.max_image_pixels} pixels per image file and "
        f"{settings.max_request_pixels} per request (declared width x height, checked before decoding); "
        f"{settings.max_json_pixels} values in the JSON images of one request; "
        f"n <= {settings.max_samples} samples; samples <= {settings.max_importance_samples} importance samples, "
        f"and images x samples <= {work} per POST /log-likelihood; "
        f"temperature <= {settings.max_temperature:g}; scale <= {settings.max_png_scale}, and a PNG answer of at "
        f"most {settings.max_response_pixels} pixels (width x height of the grid, scale included); |z| <= "
        f"{settings.max_latent_abs:g}. JSON bodies: UTF-8, nested at most 1024 levels, numbers within float range.")
    schema["x-latentserve"] = {
        "default_model": default_model,
        "models": {m.name: {"image_shape": list(m.card.image_shape), "channels": m.card.channels,
                            "data_dim": m.card.data_dim, "latent_dim": m.card.latent_dim} for m in models or ()},
        "limits": {"max_json_pixels": settings.max_json_pixels, "max_request_pixels": settings.max_request_pixels,
                   "max_response_pixels": settings.max_response_pixels, "max_png_scale": settings.max_png_scale,
                   "log_likelihood_work": work, "default_importance_samples": settings.default_importance_samples},
    }
    return schema


def _set_maximum(prop: dict, limit) -> None:
    """Set `maximum` in a parameter schema (`anyOf` of [type, null] for optional ones)."""
    targets = [s for s in prop.get("anyOf", [prop]) if s.get("type") in ("integer", "number")]
    for s in targets:
        s["maximum"] = min(s.get("maximum", limit), limit)
