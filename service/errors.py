"""Errors as application/problem+json (RFC 9457): type, title, status, detail (+ extra members).

The one place where a fault gets its HTTP answer: the domain errors of the images, the runtime (a model
not ready or unknown, a full queue) and the admission budget (`DOMAIN_PROBLEMS`), a model output that is not
finite (`non_finite_problem`), the framework's own errors, and anything unexpected (500, logged).

On the Open Inference Protocol's routes (/v2) an error takes the protocol's own form instead: `{"error":
"..."}` with Content-Type application/json, which is what its clients parse (tritonclient raises
InferenceServerException(body["error"]); KServe's client reads "error" only when the Content-Type is exactly
application/json). The problem's members stay beside `error`. Every answer below picks its form by the path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import images
from service.admission import BusyError
from service.batcher import QueueFullError
from service.postprocess import NonFiniteOutputError
from service.registry import ModelLoadError, ModelNotFoundError
from service.runtime import ModelControlOffError, NotReadyError, UnknownModelError

PROBLEM_MEDIA_TYPE = "application/problem+json"
OIP_ERROR_MEDIA_TYPE = "application/json"
TYPE_BASE = "/problems/"

log = logging.getLogger("service.errors")


class ProblemError(Exception):
    """An error answered as problem+json. `slug` names the problem type (`/problems/<slug>`)."""

    def __init__(self, status: int, title: str, detail: str, *, slug: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra


class BodyTooLargeError(Exception):
    """A streamed request body passed the size limit (raised by service/middleware.py while it is read)."""


# Domain error -> (status, title, problem type). The messages are the errors' own.
DOMAIN_PROBLEMS: dict[type[Exception], tuple[int, str, str]] = {
    images.EmptyImageError: (422, "Empty image", "empty-image"),
    images.InvalidImageError: (422, "Invalid image", "invalid-image"),
    images.ImageTooLargeError: (413, "Image too large", "image-too-large"),
    images.UnsupportedImageError: (415, "Unsupported media type", "unsupported-image"),
    images.CorruptImageError: (422, "Corrupt image", "corrupt-image"),
    images.InvalidImageArrayError: (422, "Invalid image array", "invalid-image-array"),
    images.InvalidPixelValuesError: (422, "Invalid pixel values", "invalid-pixel-values"),
    QueueFullError: (429, "Too many requests", "queue-full"),
    BusyError: (429, "Too many requests", "queue-full"),
    NotReadyError: (503, "Not ready", "not-ready"),
    UnknownModelError: (404, "Unknown model", "unknown-model"),
    ModelNotFoundError: (404, "Unknown model", "unknown-model"),
    ModelLoadError: (409, "Model load failed", "model-load-failed"),
    ModelControlOffError: (403, "Model control is off", "control-off"),
}
DOMAIN_ERRORS = tuple(DOMAIN_PROBLEMS)  # for `except` clauses of code that answers in another form (/v2)
# Answers that tell the client when to come back: Retry-After, from the settings.
_RETRY_LATER = (QueueFullError, BusyError, NotReadyError)


def problem_for(exc: Exception, retry_after_s: int | None = None) -> ProblemError:
    """The problem that answers the domain error `exc` (a key of DOMAIN_PROBLEMS, or a subclass)."""
    for cls in type(exc).__mro__:
        if cls in DOMAIN_PROBLEMS:
            status, title, slug = DOMAIN_PROBLEMS[cls]
            break
    else:
        raise TypeError(f"{type(exc).__name__} is not a domain error") from exc
    detail = f"{exc}; retry later" if isinstance(exc, QueueFullError) else str(exc)
    headers = ({"Retry-After": str(retry_after_s)} if retry_after_s is not None and isinstance(exc, _RETRY_LATER)
               else None)
    return ProblemError(status, title, detail, slug=slug, headers=headers)


def non_finite_problem(e: NonFiniteOutputError, source: str, advice: str) -> ProblemError:
    """422 saying which input (`source`) gave a non-finite `e.output`, and what to change (`advice`)."""
    return ProblemError(422, "Non-finite result", f"{source}: the model's {e.output} is not finite (NaN or "
                        f"infinite) for this input; {advice}", slug="non-finite-result", output=e.output)


def problem_body(status: int, title: str, detail: str, slug: str, **extra: Any) -> dict:
    return {"type": TYPE_BASE + slug, "title": title, "status": status, "detail": detail, **extra}


def is_oip_path(path: str) -> bool:
    """The Open Inference Protocol's routes, whose errors take its form."""
    return path == "/v2" or path.startswith("/v2/")


def error_content(path: str, status: int, title: str, detail: str, slug: str, **extra: Any) -> tuple[dict, str]:
    """(the body, its media type) of an error answer to a request for `path`."""
    body = problem_body(status, title, detail, slug, **extra)
    if is_oip_path(path):
        return {"error": detail, **body}, OIP_ERROR_MEDIA_TYPE
    return body, PROBLEM_MEDIA_TYPE


def render_json(content: Any) -> bytes:
    """Always valid UTF-8 JSON, whatever a detail quotes: lone surrogates become U+FFFD, and members that are not
    JSON (a non-finite number, an odd object) leave only the RFC 9457 core (and `error`) behind."""
    try:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        core = {k: content.get(k) for k in ("error", "type", "title", "status", "detail")} if isinstance(
            content, dict) else {}
        text = json.dumps({k: v if isinstance(v, int) else str(v) for k, v in core.items() if v is not None},
                          ensure_ascii=False, separators=(",", ":"))
    return _utf8(text)


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return render_json(content)


def _utf8(text: str) -> bytes:
    """`text` as UTF-8, lone surrogates (from a client's odd encoding) replaced by U+FFFD."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def problem_response(status: int, title: str, detail: str, slug: str, headers: dict[str, str] | None = None,
                     *, path: str, **extra: Any) -> ProblemResponse:
    """The error answer to a request for `path` (problem+json; on /v2 the protocol's form)."""
    content, media_type = error_content(path, status, title, detail, slug, **extra)
    return ProblemResponse(content, status_code=status, headers=headers, media_type=media_type)


def answer(e: ProblemError, path: str) -> ProblemResponse:
    """The answer to `e` on a request for `path`."""
    return problem_response(e.status, e.title, e.detail, e.slug, headers=e.headers, path=path, **e.extra)


def problem_bytes(status: int, title: str, detail: str, slug: str, **extra: Any) -> bytes:
    return render_json(problem_body(status, title, detail, slug, **extra))


# Short titles for HTTP errors raised by the framework (unknown path, wrong method).
_HTTP_TITLES = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 401: "Unauthorized",
                413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
                503: "Service Unavailable"}


def _jsonable_errors(errors: list[dict]) -> list[dict]:
    out = []
    for e in errors[:20]:  # enough to say what is wrong; a 784-pixel list of errors is not
        out.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))})
    return out


def invalid_request(errors: Sequence[dict], where: tuple[str, ...] = ()) -> ProblemError:
    """422 for pydantic's validation errors: each error's location and message, e.g. `query.n: ...`.

    `where` prefixes the locations (("query",) for a query model that the handler validates itself).
    """
    listed = _jsonable_errors([{**e, "loc": (*where, *e.get("loc", ()))} for e in list(errors)[:20]])
    parts = [f"{'.'.join(e['loc'])}: {e['msg']}" for e in listed[:5]]
    return ProblemError(422, "Invalid request", "; ".join(parts) or "the request is invalid",
                        slug="invalid-request", errors=listed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return answer(exc, request.scope["path"])

    async def _domain(request: Request, exc: Exception):
        return answer(problem_for(exc, request.app.state.settings.retry_after_s), request.scope["path"])

    for cls in (images.ImageError, QueueFullError, BusyError, NotReadyError, UnknownModelError,
                ModelNotFoundError, ModelLoadError, ModelControlOffError):
        app.add_exception_handler(cls, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return answer(invalid_request(exc.errors()), request.scope["path"])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, BodyTooLargeError):  # FastAPI wraps body-read errors in a 400
            return problem_response(413, "Content too large", "the request body is larger than the size limit",
                                    "content-too-large", path=request.scope["path"])
        title = _HTTP_TITLES.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint at {request.url.path}; see /docs for the API"
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(exc.status_code, title, detail, title.lower().replace(" ", "-"),
                                headers=getattr(exc, "headers", None), path=request.scope["path"])

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        # The client closed the connection before its body arrived: nobody reads the answer, and it is
        # no server error. 499 (nginx's "client closed request") keeps it apart in the logs and metrics.
        log.info("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - a bug, logged with its trace
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal Server Error", "an unexpected error occurred; it has been logged",
                                "internal-error", path=request.scope["path"])
