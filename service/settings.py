"""Service settings: environment variables with the prefix `LATENTSERVE_` (pydantic-settings).

Read when `create_app()` or `python -m service` runs, never at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Tried in this order when no default model is configured; otherwise the first loaded (by name).
PREFERRED_DEFAULTS = ("flow-vae-mnist", "vae-mnist", "ppca-mnist")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTSERVE_", env_file=None, extra="ignore")

    # Models
    models_dir: Path = Field(Path("models"), description="the model repository (one folder per model)")
    default_model: str | None = Field(None, description=f"model used when a request names none "
                                      f"(default: the first of {', '.join(PREFERRED_DEFAULTS)} present)")
    # Model lifecycle (issue 16): service/registry.py
    repository_poll_seconds: float = Field(2.0, ge=0, le=86400, description="seconds between two looks at the "
                                           "model repository: new folders are loaded, changed ones reloaded, "
                                           "removed ones unloaded; 0: never (load once at start, then only on "
                                           "POST /models/{name}/load)")
    required_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models that must be loaded for GET /ready to answer 200 (besides at "
        "least one model), comma-separated or a JSON list, e.g. ppca-mnist,vae-mnist")

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    access_log: bool = Field(False, description="uvicorn's own access log (the service logs one JSON line per request)")
    timeout_graceful_shutdown: float = Field(8.0, ge=0, description="seconds the requests in flight get to finish "
                                             "after SIGTERM (and drain_s); the unfinished are then answered 503. "
                                             "With drain_s and 1 s to answer, below the container stop timeout "
                                             "(docker stop: 10 s)")
    api_key: SecretStr | None = Field(None, description="when set, every endpoint but /health and /ready needs it "
                                      "(header X-API-Key or Authorization: Bearer)")
    cors_origins: list[str] = Field(default_factory=list, description='allowed CORS origins, e.g. ["*"]')
    opentelemetry: bool = Field(False, description="FastAPI's native OpenTelemetry spans, metrics and logs, to the "
                                "providers the process configures (e.g. opentelemetry-instrument); off, a request "
                                "does not look for them (the service's own metrics are at /metrics)")

    # ONNX Runtime
    intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads per session")
    inference_workers: int = Field(2, ge=1, le=64, description="threads running ONNX Runtime calls")

    # Micro-batching (as Triton's dynamic batcher)
    batching: bool = True
    max_batch_size: int = Field(64, ge=1, le=4096, description="rows per merged ONNX Runtime call")
    max_queue_delay_ms: float = Field(2.0, ge=0, le=1000, description="how long a batch waits for more requests")
    max_queue_size: int = Field(256, ge=1, description="queued requests per graph before answering 429")
    bound_chunk_rows: int = Field(2048, ge=1, description="importance samples per call of the bound graph (its "
                                  "memory grows with them)")
    batch_pad_multiple: int = Field(8, ge=1, le=64, description="pad every call's batch to a multiple of this, so "
                                    "that a row's result never depends on what it was batched with")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429")

    # Limits on requests
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_images: int = Field(64, ge=1, description="images (or latent codes) per request")
    max_image_pixels: int = Field(2048 * 2048, ge=1, description="declared width x height above which an image "
                                  "is refused before decoding (decompression bombs)")
    max_samples: int = Field(256, ge=1, description="GET /sample: largest n")
    max_importance_samples: int = Field(5000, ge=1, description="POST /log-likelihood: largest samples (S)")
    default_importance_samples: int = Field(100, ge=1)
    max_latent_abs: float = Field(1e3, gt=0, description="largest |z| accepted by /decode")
    max_temperature: float = Field(10.0, gt=0)
    max_png_scale: int = Field(16, ge=1)

    # Request parsing
    max_request_pixels: int = Field(8 * 1024 * 1024, ge=1, description="decoded pixels per request, all images "
                                    "together: refused (413) from the sizes the files declare, before decoding")
    max_json_pixels: int = Field(64 * 64 * 64, ge=1, description="values in the JSON images of one request (JSON "
                                 "costs more than a file per pixel to parse); counted in the body before parsing")

    # Inference and responses (admission control, memory, response size)
    max_inflight_work: int = Field(131072, ge=1, description="work in flight across all endpoints, in rows that "
                                   "ONNX Runtime computes (padding included; one importance sample is one row); "
                                   "beyond it requests get 429. A request larger than this runs only alone")
    max_response_pixels: int = Field(2048 * 2048, ge=1, description="largest PNG answered (width x height after "
                                     "scaling); larger requests get 413")
    postprocess_workers: int = Field(2, ge=1, le=64, description="threads encoding large responses (PNG, JSON)")
    ort_cpu_arena: bool = Field(True, description="ONNX Runtime's CPU memory arena (faster small calls); the bound "
                                "graph's calls, the large ones, hand their memory back to it after each call")
    trim_after_work: int = Field(4096, ge=0, description="after a request of at least this much work (rows), give "
                                 "free memory back to the system (glibc malloc_trim); 0: never")
    gc_threshold: int = Field(5000, ge=1, description="container objects allocated (less those freed) between two "
                              "collections of the garbage collector's youngest generation (Python's default: 700, "
                              "which requests in flight reach several times a second and have walked for nothing)")

    # Operations (slow clients, shutdown)
    header_timeout_s: float = Field(10.0, gt=0, description="seconds a request has to send its request line and "
                                    "headers (from its first byte; from the connection's start for the first "
                                    "request); 408 and the connection closed after that")
    body_timeout_s: float = Field(30.0, gt=0, description="seconds a request has to send its whole body once its "
                                  "headers are in; 408 and the connection closed after that")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="largest request line + headers; 431 beyond")
    max_connections: int = Field(1024, ge=1, description="open connections at most; one more is answered 503 and "
                                 "closed at once (keep it below the process's open-file limit)")
    drain_s: float = Field(0.0, ge=0, le=300, description="after SIGTERM, seconds to go on serving while /ready "
                           "answers 503 (time for a load balancer to stop sending), before the graceful shutdown")

    @field_validator("required_models", mode="before")
    @classmethod
    def _names(cls, v):
        if isinstance(v, str):
            v = json.loads(v) if v.lstrip().startswith("[") else [n.strip() for n in v.split(",") if n.strip()]
        return v

    @field_validator("api_key")
    @classmethod
    def _api_key_not_blank(cls, v: SecretStr | None) -> SecretStr | None:
        # An empty value is not "no key": a blank `LATENTSERVE_API_KEY=` line in .env reaches the process through
        # compose as "", and would let in every request that sends an empty X-API-Key.
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("LATENTSERVE_API_KEY is set but empty or blank: set a real key, or remove the "
                             "variable (unset, not empty) to serve without one")
        return v
