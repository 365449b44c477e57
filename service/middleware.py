"""Pure ASGI middlewares: request id + one JSON log line + metrics, API key, body size limit."""

from __future__ import annotations

import hmac
import json
import logging
import random
import re
import time
from typing import Any

from service import web
from service.errors import BodyTooLargeError, error_content, render_json
from service.metrics import Metrics

access_log = logging.getLogger("service.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Open without the API key: the probes, and the web page's static files
OPEN_PATHS = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready"}) | web.OPEN_PATHS


async def send_problem(scope, send, status: int, title: str, detail: str, slug: str,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An error answer to the request of `scope`, in its path's form (service/errors.py)."""
    content, media_type = error_content(scope["path"], status, title, detail, slug)
    body = render_json(content)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def _new_request_id() -> str:
    # 128 random bits from Python's generator: unique enough to trace a request, and without the
    # os.urandom system call that uuid4() makes (tens of microseconds in some VMs, on every request).
    return f"{random.getrandbits(128):032x}"


class RequestContextMiddleware:
    """X-Request-ID (taken from the request when well-formed, else made), a JSON log line and metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        rid = given.decode("latin-1") if given and _REQUEST_ID.match(given.decode("latin-1")) else _new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start = time.perf_counter()
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            latency = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model = self.metrics.model_label(state.get("model"))  # bounded: unknown names share one value
            code = status[0]
            self.metrics.record(endpoint, model, code, latency)
            if access_log.isEnabledFor(logging.INFO):
                record: dict[str, Any] = {
                    "event": "request", "request_id": rid, "method": scope.get("method"),
                    "endpoint": endpoint, "path": scope.get("path"), "model": state.get("model"),
                    "status": code, "batch_size": state.get("batch_size"),
                    "latency_ms": round(latency * 1000.0, 3),
                }
                access_log.info(json.dumps(record, separators=(",", ":")))


class APIKeyMiddleware:
    """When an API key is set, every path but /health, /ready and the web page's static files (service/web.py)
    needs it (X-API-Key or Bearer), OPTIONS too.

    A CORS preflight from an allowed origin never gets here: CORSMiddleware (outside this one) answers it.
    """

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(web.OPEN_PREFIX):
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-api-key")
        if given is None:
            auth = _header(scope, b"authorization") or b""
            if auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
        if given is not None and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        await send_problem(scope, send, 401, "Unauthorized", "this endpoint needs the API key: send it in the "
                           "X-API-Key header or as Authorization: Bearer <key>", "unauthorized",
                           [(b"www-authenticate", b'Bearer realm="latentserve"')])


class BodySizeLimitMiddleware:
    """413 before the body is read when Content-Length is over the limit; counts streamed bytes otherwise.

    After a request whose body reached `large_bytes`, calls `after_large_body()`: megabytes of body chunks,
    freed, stay in the allocator's arenas until they are handed back (service/memory.py).
    """

    def __init__(self, app, max_bytes: int, large_bytes: int = 1 << 20, after_large_body=None):
        self.app, self.max_bytes = app, max_bytes
        self.large_bytes, self.after_large_body = large_bytes, after_large_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                return await send_problem(scope, send, 400, "Bad Request", "invalid Content-Length header",
                                          "bad-request")
            if length > self.max_bytes:
                return await self._too_large(scope, send)
            # The server hands the app no more body than Content-Length says (the bytes after it are the next
            # request), so there is nothing left to count.
            try:
                return await self.app(scope, receive, send)
            finally:
                if length >= self.large_bytes and self.after_large_body is not None:
                    self.after_large_body()
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await self._too_large(scope, send)
        finally:
            if received >= self.large_bytes and self.after_large_body is not None:
                self.after_large_body()

    async def _too_large(self, scope, send):
        await send_problem(scope, send, 413, "Content too large", f"the request body is larger than the limit of "
                           f"{self.max_bytes} bytes", "content-too-large", [(b"connection", b"close")])
