"""The inference lane: requests to the inference routes skip the framework's layers that they never use.

Every request to a FastAPI app passes, besides the service's own middlewares (service/middleware.py), through
FastAPI's telemetry and body-limit layers, Starlette's exception middleware, an exit-stack layer, the router
(which tries each route's pattern in turn) and the route's request/response wrapper with two more exit stacks.
The inference handlers use none of what those add (no dependencies, no form files, no telemetry when it is
off): on the event loop they cost more than a third of a small OIP binary request (docs/benchmarks.md). So the
app's stack is built with this lane in front: a POST (GET for /sample) to an inference route goes through the
same middleware instances' classes and settings (request id, log and metrics, the API key, the body limit,
CORS), then straight to its handler, whose exceptions go to the app's own exception handlers
(service/errors.py); any other request, and every request when OpenTelemetry is on, takes the full stack.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.endpoint import RequestRoute

# Infer paths whose route match is kept (service/lane.py `_infer_route`)
MATCHED_PATHS = 256


class InferenceLane:
    """ASGI: the inference routes' requests through the lane, the others to `full` (the app's usual stack)."""

    def __init__(self, app, full: ASGIApp):
        self.full = full
        handlers: dict[Any, Callable] = {}
        error_handler = None
        for key, handler in app.exception_handlers.items():
            if key in (500, Exception):
                error_handler = handler  # answered outermost, as Starlette's ServerErrorMiddleware does
            else:
                handlers[key] = handler
        self.handlers = handlers
        # (method, path) -> route for the inference routes with a fixed path; the /v2 infer routes by pattern
        self.fixed: dict[tuple[str, str], RequestRoute] = {}
        self.patterns: list[Route] = []
        self._matched: dict[tuple[str, str], tuple[Route, dict]] = {}  # (root path, path) -> route, path params
        for route in app.router.routes:
            if isinstance(route, RequestRoute):
                for method in route.methods or ():
                    self.fixed[(method, route.path)] = route
            elif isinstance(route, Route) and route.path.endswith("/infer"):
                self.patterns.append(route)
        inner: ASGIApp = self._endpoint
        for m in reversed(app.user_middleware):
            inner = m.cls(inner, *m.args, **m.kwargs)
        self.lane = ServerErrorMiddleware(inner, handler=error_handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.fixed.get((scope["method"], scope["path"]))
            if route is None and scope["method"] == "POST" and scope["path"].startswith("/v2/models/"):
                route = self._infer_route(scope)
            if route is not None:
                scope["route"] = route
                return await self.lane(scope, receive, send)
        await self.full(scope, receive, send)

    def _infer_route(self, scope: Scope) -> Route | None:
        """The /v2 infer route matching the path (its path parameters into the scope), or None.

        A path matched once is looked up after that: a client calls the same few models again and again. The
        table is bounded (emptied when full), so that invented names cost a match each, as they did, and no
        memory."""
        key = (scope.get("root_path", ""), scope["path"])
        known = self._matched.get(key)
        if known is not None and "path_params" not in scope:
            route, params = known
            scope["endpoint"], scope["path_params"] = route.endpoint, dict(params)
            return route
        for candidate in self.patterns:
            match, child = candidate.matches(scope)
            if match is Match.FULL:
                if "path_params" not in scope:  # the server's scope (no outer router has matched a part of it)
                    if len(self._matched) >= MATCHED_PATHS:
                        self._matched.clear()
                    self._matched[key] = (candidate, dict(child["path_params"]))
                scope.update(child)
                return candidate
        return None

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["route"]
        if not isinstance(route, RequestRoute):  # a /v2 infer endpoint: an ASGI app answering its own errors
            return await route.endpoint(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # to the middlewares that answer it (the body limit's 413) or to the 500 handler
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable | None:
        for cls in type(exc).__mro__:  # the most specific handler, as Starlette looks it up
            if cls in self.handlers:
                return self.handlers[cls]
        return None
