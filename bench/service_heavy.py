"""Heavy inference requests against a live server: log-likelihood latency and resident memory.

    .venv/bin/python -m bench.service_heavy --models-dir models --model flow-vae-mnist
    .venv/bin/python -m bench.service_heavy --base ../before ...   # side by side with another checkout

Starts `python -m service` from this checkout (and, with `--base`, from another one: the code before a
change) on 127.0.0.1 with the given environment (`--env NAME=VALUE`, e.g. MALLOC_ARENA_MAX=2), in
`--rounds` rounds that start each server in turn (the machine's speed drifts between minutes: the two
are compared within a round). Over real HTTP, per server:
1. POST /log-likelihood, one image, samples=1000: median latency of `--repeats` requests, one client;
2. POST /log-likelihood, 16 images, samples=5000: its latency, the server's peak resident memory while it
   ran (VmRSS sampled every 5 ms) and its resident memory 2 s afterwards, against its baseline.
Prints a table and records it in docs/benchmarks.md ("Service: heavy requests"; `--no-report`: not).
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

from bench.servers import free_port, rss_mb, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def start(args, checkout: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    env.update({"LATENTSERVE_MODELS_DIR": str(Path(args.models_dir).resolve()), "LATENTSERVE_PORT": str(port),
                "LATENTSERVE_DEFAULT_MODEL": args.model, "LATENTSERVE_LOG_LEVEL": "warning"})
    env.update(dict(e.split("=", 1) for e in args.env))
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=checkout, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + "/ready")
    return proc, url


def measure(args, checkout: str, images: list) -> dict[str, float]:
    """The figures of one server started from `checkout` (see the module docstring)."""
    proc, url = start(args, checkout)
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            for _ in range(5):  # warm-up
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
            peak, stop = [0.0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_mb(proc.pid))
                    time.sleep(0.005)

            t = threading.Thread(target=sample)
            t.start()
            t0 = time.perf_counter()
            r = c.post("/log-likelihood?samples=5000&seed=0", json={"images": images})
            big_ms = (time.perf_counter() - t0) * 1000
            stop.set()
            t.join()
            assert r.status_code == 200, r.text
            time.sleep(2)
            return {"one_ms": statistics.median(times), "base_mb": base, "big_s": big_ms / 1000,
                    "peak_mb": peak[0], "after_mb": rss_mb(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", default=str(ROOT / "models"))
    p.add_argument("--model", default="flow-vae-mnist")
    p.add_argument("--base", default=None, help="another checkout (the code before a change) to measure alongside")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the servers' environment")
    p.add_argument("--repeats", type=int, default=40, help="one-image requests per server and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    images = (rng.random((16, 784)) < 0.2).astype(float).tolist()
    servers = {"this checkout": str(ROOT)} | ({"--base": args.base} if args.base else {})
    got: dict[str, list[dict[str, float]]] = {k: [] for k in servers}
    for r in range(args.rounds):
        for name, checkout in servers.items():
            got[name].append(measure(args, checkout, images))
            print(f"round {r + 1}, {name}: {got[name][-1]}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in got[name])

    rows = [[name, f"{med(name, 'one_ms'):.1f}", f"{med(name, 'big_s'):.1f}", f"{med(name, 'base_mb'):.0f}",
             f"{med(name, 'peak_mb'):.0f}", f"{med(name, 'after_mb'):.0f}",
             f"{med(name, 'after_mb') - med(name, 'base_mb'):+.0f}"] for name in servers]
    from bench.report import publish, table

    body = table(["server", "1 image, S=1000: median ms", "16 images, S=5000: s", "baseline RSS MB",
                  "peak RSS MB", "RSS 2 s after MB", "after - baseline MB"], rows)
    body += (f"\n\nModel {args.model}, POST /log-likelihood over real HTTP, one client; medians over {args.rounds} "
             f"rounds of {args.repeats} one-image requests and one 16-image request per server"
             + (f"; `--base` is {args.base}" if args.base else "") + ".")
    if args.base:
        ratios = [b["one_ms"] / a["one_ms"] for a, b in zip(got["this checkout"], got["--base"], strict=True)]
        body += f" One-image latency, base / this checkout within each round: {', '.join(f'{x:.1f}x' for x in ratios)}."
    publish("Service: heavy requests (POST /log-likelihood)", body, module="bench.service_heavy",
            save=not args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
