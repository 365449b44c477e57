"""Helpers shared by the service tests (imported as a plain module: tests/service is on sys.path)."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings


def settings_for(repo: Path, **overrides) -> Settings:
    base = {"models_dir": repo, "log_level": "warning", "max_queue_delay_ms": 1.0}
    base.update(overrides)
    return Settings(**base)


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"the app was not ready after {timeout} s: {client.get('/ready').text}")


def image_bytes(pixels: np.ndarray, mode: str = "L", fmt: str = "PNG", **save) -> bytes:
    """float [H, W] in [0, 1] -> an image file written by Pillow."""
    u8 = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(u8, mode="L")
    if mode != "L":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


async def run_with_app(settings: Settings, coro_fn):
    """Run `coro_fn(client, app)` against the app with its lifespan, through httpx's ASGI transport."""
    import httpx

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.loading_task
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await coro_fn(c, app)


def run_async(settings: Settings, coro_fn):
    return asyncio.run(run_with_app(settings, coro_fn))
