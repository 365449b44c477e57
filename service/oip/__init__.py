"""The Open Inference Protocol (KServe v2 / Triton REST) under /v2, beside the native API.

    routes.py    the endpoints (health, metadata, readiness, infer, repository index)
    repository.py  the repository extension's load and unload (through service/registry.py)
    models.py    the registry as OIP models: every graph of every folder is `{folder}.{graph}`
    tensors.py   JSON tensors and the binary tensor data extension, in and out
    errors.py    errors on /v2 as `{"error": "..."}` (application/json)

service/app.py puts `infer_routes` first and `routes` last among its routes, and the error middleware
outside the API key and body size checks (their errors on /v2 are rewritten too).
"""

from __future__ import annotations

from service.oip.errors import OIPErrorMiddleware
from service.oip.routes import infer_routes, routes

__all__ = ["OIPErrorMiddleware", "infer_routes", "routes"]
