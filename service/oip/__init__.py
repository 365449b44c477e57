"""The Open Inference Protocol (KServe v2 / Triton REST) under /v2, beside the native API.

    routes.py    the endpoints (health, metadata, readiness, infer, repository index)
    repository.py  the repository extension's load and unload (through service/registry.py)
    models.py    the registry as OIP models: every graph of every folder is `{folder}.{graph}`
    tensors.py   JSON tensors and the binary tensor data extension, in and out
    errors.py    errors on /v2 as `{"error": "..."}` (application/json)

`install(app)` adds the routes and the error middleware; create_app calls it where the middleware order
puts the error middleware outside the API key and body size checks (their errors are rewritten too).
"""

from __future__ import annotations

from fastapi import FastAPI

from service.oip.errors import OIPErrorMiddleware
from service.oip.routes import infer_routes, routes


def install(app: FastAPI) -> None:
    app.router.routes[:0] = infer_routes  # first: see service/oip/routes.py
    app.router.routes.extend(routes)
    app.add_middleware(OIPErrorMiddleware)
