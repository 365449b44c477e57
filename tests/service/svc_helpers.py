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


# --------------------------------------------------------------------------------------------------
# A real server: `python -m service` in a subprocess on 127.0.0.1, spoken to over real HTTP
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A running `python -m service`: its base `url`, the process, and its log (stdout and stderr)."""

    def __init__(self, proc, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def start_server(repo: Path, log_path: Path, *, ready: bool = True, timeout: float = 90.0,
                 command_prefix: tuple[str, ...] = (), **env: str) -> LiveServer:
    """Start `python -m service` serving `repo` (settings as LATENTSERVE_* variables: `env`), wait for /ready.

    `command_prefix` runs the server under another command (e.g. setpriv, to drop privileges)."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    # The caller's LATENTSERVE_* variables are left out: the server gets exactly these settings.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    full_env.update({"LATENTSERVE_MODELS_DIR": str(repo), "LATENTSERVE_HOST": "127.0.0.1",
                     "LATENTSERVE_PORT": str(port), "LATENTSERVE_LOG_LEVEL": "info",
                     **{f"LATENTSERVE_{k.upper()}": str(v) for k, v in env.items()}})
    out = open(log_path, "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen([*command_prefix, sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    path = "/ready" if ready else "/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + path, timeout=2.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"the server did not answer {path} within {timeout} s:\n{server.log()[-4000:]}")
