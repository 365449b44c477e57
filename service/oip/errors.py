"""Errors on /v2 in the Open Inference Protocol's form: `{"error": "..."}`, Content-Type application/json.

Clients of the protocol read exactly that (tritonclient raises InferenceServerException(body["error"]);
KServe's client takes "error" only when the Content-Type is exactly application/json). Every other part
of the service answers errors as problem+json (service/errors.py), from the route handlers and from the
middlewares in front of them (API key, body size limit), so this middleware sits outside those and
rewrites any problem+json answer to a /v2 path: `error` holds the problem's detail, and the problem's
members stay beside it. Other paths pass through untouched.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

from service.errors import PROBLEM_MEDIA_TYPE, ProblemError, problem_body

_PROBLEM = PROBLEM_MEDIA_TYPE.encode()


def is_oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def oip_error_body(problem: bytes) -> bytes:
    """A problem+json body as the protocol's error object (the problem's members kept beside `error`)."""
    try:
        content = orjson.loads(problem)
    except orjson.JSONDecodeError:
        content = None
    if not isinstance(content, dict):
        return orjson.dumps({"error": problem.decode("utf-8", "replace")})
    detail = content.get("detail") or content.get("title") or "error"
    return orjson.dumps({"error": str(detail), **content})


def error_response(e: ProblemError) -> Response:
    """`e` answered in the protocol's form directly (the routes that catch their own errors)."""
    body = problem_body(e.status, e.title, e.detail, e.slug, **e.extra)
    return Response(orjson.dumps({"error": e.detail, **body}), status_code=e.status, media_type="application/json",
                    headers=e.headers)


class OIPErrorMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_oip_path(scope["path"]):
            return await self.app(scope, receive, send)
        held: dict | None = None  # the response start of a problem, until its body is complete
        chunks: list[bytes] = []

        async def send_oip(message):
            nonlocal held
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                if message["status"] >= 400 and any(k.lower() == b"content-type" and v.startswith(_PROBLEM)
                                                    for k, v in headers):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = oip_error_body(b"".join(chunks))
                headers = [(k, v) for k, v in held.get("headers", [])
                           if k.lower() not in (b"content-type", b"content-length")]
                await send({**held, "headers": [*headers, (b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_oip)
