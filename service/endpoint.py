"""The fast path of the inference endpoints, behind one declaration per endpoint.

    endpoints = Endpoints()

    @endpoints.post("/encode", query=EncodeQuery, body=IMAGE_BODY, response=EncodeResponse,
                    errors=(400, 404, 413, 415, 422, 429, 503), summary="images -> posterior mean and log-variance")
    async def encode(request: Request, q: EncodeQuery) -> Response: ...

The handler gets the request and its query string validated by the query model (service/inputs.py
`read_query`: 422 naming the parameter, the live settings' limits applied), and returns a Response. The
declaration also writes the query parameters, the request body and the error responses into OpenAPI, which
cannot see them in the handler's signature. `endpoints.routes` go into the app (service/app.py).

Why not plain FastAPI routes: for those FastAPI solves the handler's dependency graph and inspects its
result on every request, even when there is nothing to solve, and validates each query parameter
separately; together that was more of POST /encode's time on the event loop than the rest of the route
(docs/benchmarks.md). A :class:`RequestRoute` is still an APIRoute: OpenAPI documents it like any other.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.inputs import read_query
from service.openapi import PNG_RESPONSE, error_responses, query_openapi

Handler = Callable[[Request, Any], Awaitable[Response]]


class RequestRoute(APIRoute):
    """A route whose handler takes (request, query) and returns a Response; FastAPI calls it as it is."""

    def __init__(self, path: str, endpoint: Handler, *, query: type[BaseModel], **kwargs):
        names = list(inspect.signature(endpoint).parameters)
        if len(names) != 2 or names[0] != "request":
            raise TypeError(f"{endpoint.__name__}: a RequestRoute handler takes (request, query), got {names}")

        async def handle(request: Request) -> Response:
            return await endpoint(request, read_query(request, query))

        # FastAPI reads the route's parameters from the signature of what it is given: `handle` has the request
        # alone (the query model would otherwise be documented as a JSON body); the name and the docstring are
        # the handler's, for OpenAPI's operation id and description.
        handle.__name__, handle.__qualname__ = endpoint.__name__, endpoint.__qualname__
        handle.__doc__ = endpoint.__doc__
        self.query = query
        super().__init__(path, handle, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        return self.endpoint


class Endpoints:
    """Inference endpoints declared with `get` / `post`; their routes in `routes`."""

    def __init__(self, tag: str = "inference"):
        self.tag = tag
        self.routes: list[RequestRoute] = []

    def get(self, path: str, **declaration) -> Callable[[Handler], Handler]:
        return self._declare("GET", path, **declaration)

    def post(self, path: str, **declaration) -> Callable[[Handler], Handler]:
        return self._declare("POST", path, **declaration)

    def _declare(self, method: str, path: str, *, query: type[BaseModel], response: type[BaseModel], summary: str,
                 errors: tuple[int, ...], body: dict | None = None, png: str | None = None
                 ) -> Callable[[Handler], Handler]:
        """`body`: the request body's OpenAPI (service/openapi.py IMAGE_BODY, DECODE_BODY); `png`: the 200
        description when the answer may be a PNG. Every endpoint may answer 401 (when an API key is set)."""
        responses: dict[int | str, Any] = {200: {**PNG_RESPONSE, "description": png}} if png else {}
        responses.update(error_responses(*sorted({*errors, 401})))

        def add(handler: Handler) -> Handler:
            self.routes.append(RequestRoute(path, handler, query=query, methods=[method], response_model=response,
                                            tags=[self.tag], responses=responses, summary=summary,
                                            openapi_extra=query_openapi(query, **(body or {}))))
            return handler

        return add
