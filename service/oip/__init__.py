"""The Open Inference Protocol (KServe v2 / Triton REST) under /v2, beside the native API.

    routes.py    the endpoints (health, metadata, readiness, infer, repository index)
    repository.py  the repository extension's load and unload (through service/registry.py)
    models.py    the registry as OIP models: every graph of every folder is `{folder}.{graph}`
    tensors.py   JSON tensors and the binary tensor data extension, in and out

Errors on /v2 take the protocol's form, `{"error": "..."}` (application/json), where every error is answered
(service/errors.py). service/app.py puts `infer_routes` first and `routes` last among its routes.
"""

from __future__ import annotations

from service.oip.routes import infer_routes, routes

__all__ = ["infer_routes", "routes"]
