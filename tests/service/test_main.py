"""The service as a separate process (`python -m service`), spoken to over real HTTP on 127.0.0.1."""

from __future__ import annotations

import signal

import httpx
import numpy as np
from svc_helpers import image_bytes


def test_encode_a_png_upload_and_sample_over_http(live):
    png = image_bytes(np.random.default_rng(0).random((8, 8)))
    r = httpx.post(f"{live.url}/encode", files=[("images", ("d.png", png, "image/png"))], timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "ppca-digits" and len(r.json()["results"][0]["mean"]) == 5
    s = httpx.get(f"{live.url}/sample", params={"n": 4, "seed": 1}, timeout=30)
    assert s.status_code == 200 and s.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_sigterm_exits_cleanly(model_repo, tmp_path):
    from svc_helpers import start_server

    server = start_server(model_repo, tmp_path / "server.log")
    # uvicorn re-raises the signal it caught once it has shut down, so a clean stop ends "killed by SIGTERM"
    assert server.stop() in (0, -signal.SIGTERM), server.log()[-2000:]
    assert "Finished server process" in server.log() and "Traceback" not in server.log()
