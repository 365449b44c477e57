"""Heavy inference requests against a live server: log-likelihood latency and resident memory.

    .venv/bin/python -m bench.service_heavy --models-dir models --model flow-vae-mnist
    .venv/bin/python -m bench.service_heavy --checkout /path/to/other/checkout ...   # the same, another version

Starts `python -m service` from `--checkout` (default: this one) on 127.0.0.1 with the given
LATENTSERVE_* settings and environment (`--env NAME=VALUE`, e.g. MALLOC_ARENA_MAX=2), then over real HTTP:
1. POST /log-likelihood, one image, samples=1000: median and p90 latency of `--repeats` requests, one client;
2. POST /log-likelihood, 16 images, samples=5000 (`--big-rounds` times): its latency, the server's peak
   resident memory while it ran (VmRSS sampled every 5 ms) and its resident memory 2 s afterwards.
Prints one line per figure; records nothing (the lead records figures in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(args) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    env.update({"LATENTSERVE_MODELS_DIR": str(Path(args.models_dir).resolve()), "LATENTSERVE_PORT": str(port),
                "LATENTSERVE_DEFAULT_MODEL": args.model, "LATENTSERVE_LOG_LEVEL": "warning"})
    env.update(dict(e.split("=", 1) for e in args.env))
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=args.checkout, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("the server did not get ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--model", default="flow-vae-mnist")
    p.add_argument("--checkout", default=str(ROOT))
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server's environment")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--big-rounds", type=int, default=2)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    images = (rng.random((16, 784)) < 0.2).astype(float).tolist()
    proc, url = start(args)
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            for _ in range(5):
                r = c.post("/log-likelihood?samples=1000&seed=1", json={"images": images[:1]})
                assert r.status_code == 200, r.text
            time.sleep(1)
            base = rss_mb(proc.pid)
            times = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                r = c.post(f"/log-likelihood?samples=1000&seed={i}", json={"images": images[:1]})
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
            times.sort()
            print(f"{args.model} one image, samples=1000: median {statistics.median(times):.1f} ms, "
                  f"p90 {times[int(0.9 * len(times))]:.1f} ms ({args.repeats} requests)", flush=True)
            time.sleep(1)
            print(f"baseline RSS {base:.0f} MB; after the small requests {rss_mb(proc.pid):.0f} MB", flush=True)
            for k in range(args.big_rounds):
                peak, stop = [0.0], threading.Event()

                def sample(peak=peak, stop=stop):
                    while not stop.is_set():
                        peak[0] = max(peak[0], rss_mb(proc.pid))
                        time.sleep(0.005)

                t = threading.Thread(target=sample)
                t.start()
                t0 = time.perf_counter()
                r = c.post(f"/log-likelihood?samples=5000&seed={k}", json={"images": images})
                ms = (time.perf_counter() - t0) * 1000
                stop.set()
                t.join()
                assert r.status_code == 200, r.text
                time.sleep(2)
                print(f"16 images x samples=5000, round {k + 1}: {ms:.0f} ms, peak RSS {peak[0]:.0f} MB, "
                      f"RSS 2 s after {rss_mb(proc.pid):.0f} MB (baseline {base:.0f} MB)", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
