"""The two reference servers of bench/service_load.py, in the same FastAPI + uvicorn stack as the service.

No `from __future__ import annotations` here: FastAPI resolves the handlers' annotations at run time,
and the upload type must be a real class, not a string.
"""

import io

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile


def trivial_app() -> FastAPI:
    """(a) The HTTP stack's ceiling: parse the same multipart upload, return a constant."""
    app = FastAPI()

    @app.post("/encode")
    async def encode(images: list[UploadFile] = File(...)):  # noqa: B008
        for f in images:
            await f.read()
        return {"model": "trivial", "results": [{"mean": [0.0]}]}

    return app


def raw_body_app() -> FastAPI:
    """(a') A stricter ceiling: read the body as bytes without parsing the multipart form, return a constant."""
    app = FastAPI()

    @app.post("/encode")
    async def encode(request: Request):
        await request.body()
        return {"model": "trivial", "results": [{"mean": [0.0]}]}

    return app


def torch_app(checkpoint: str, model: str) -> FastAPI:
    """(b) What users write by hand: decode the PNG and run the torch model eagerly per request."""
    import torch
    from PIL import Image

    from training.common import load_checkpoint
    from training.drivers import driver_for

    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    net = driver_for(ckpt["kind"]).build_model(ckpt)
    app = FastAPI()

    @app.post("/encode")
    def encode(images: list[UploadFile] = File(...)):  # noqa: B008 - sync: FastAPI's thread pool
        xs = [np.asarray(Image.open(io.BytesIO(f.file.read())).convert("L"), np.float32).reshape(-1) / 255
              for f in images]
        with torch.no_grad():
            mean, log_var = net.encode(torch.as_tensor(np.stack(xs)))[:2]
        return {"model": model, "results": [{"mean": m.tolist(), "log_var": v.tolist()}
                                            for m, v in zip(mean, log_var, strict=True)]}

    return app
