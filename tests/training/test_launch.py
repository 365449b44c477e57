"""scripts/run's flow (launcher/run.py) with three tiny default models, without a terminal: the service answers
at once, serves each model as its export lands and says where to look; the fits' progress comes as plain lines,
a failed fit as its own error; SIGTERM stops it all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]

LAUNCH = """
import sys
from launcher import run as launch
from training import defaults, progress
progress.PLAIN_EVERY_S = 1.0
from training.config import DataOptions, FitJob
from training.train_ppca import PPCAFit
from training.train_vae import VAEFit
defaults.DEFAULT_MODELS = {
    "ppca-tiny": FitJob("ppca", PPCAFit(method="closed-form", latent_dim=3), DataOptions("digits")),
    "vae-tiny": FitJob("vae", VAEFit(latent_dim=2, hidden=(16,), epochs=60, eval_samples=4, likelihood="bernoulli"),
                       DataOptions("digits")),
    "no-data": FitJob("ppca", PPCAFit(), DataOptions("/nonexistent/data.npz")),
}
sys.exit(launch.main(sys.argv[1:]))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_each_model_as_it_lands_with_plain_progress(tmp_path):
    port, log = _port(), tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    env["LATENTSERVE_REPOSITORY_POLL_SECONDS"] = "0.3"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--port", str(port), "--models-dir",
                                 str(tmp_path / "models")], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, up = time.monotonic() + 300, None
        while time.monotonic() < deadline and "now serving" not in log.read_text() and proc.poll() is None:
            if up is None:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        up = httpx.get(f"{url}/ready", timeout=2)  # before any model is exported
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        text = log.read_text()
        assert "now serving" in text, text[-3000:]
        assert up is not None and up.status_code == 503
        for model in ("ppca-tiny", "vae-tiny"):
            r = httpx.post(f"{url}/encode", params={"model": model}, json={"images": [[0.5] * 64]}, timeout=10)
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    first = text.index("[run] serving ")
    assert text[first:].startswith(f"[run] serving ppca-tiny at {url}") or \
        text[first:].startswith(f"[run] serving ppca-tiny, vae-tiny at {url}"), text[first:first + 200]
    assert f"[run]   API docs:  {url}/docs" in text
    assert "[build-defaults] vae-tiny: epoch " in text and "train ELBO" in text and "ETA" in text
    assert "[build-defaults] no-data: the fit failed: " in text
    assert "/nonexistent/data.npz: no such file or directory" in text
    assert "scripts-run-watcher" not in text  # its own polls are not shown
    assert "Application shutdown complete" in text  # the service drained and stopped
