"""This checkout's service against another checkout's (`--base`), both up at once, POST /encode under wrk in turn.

    .venv/bin/python -m bench.service_ab --base ../before --models-dir models --model vae-mnist --pairs 10
    .venv/bin/python -m bench.service_ab --base ../before ... --request "OIP binary"   # or "OIP JSON" (bench/oip.py)

`bench/service_load.py --base` starts its servers one after another, a minute or more apart; on a shared machine
the drift between them can exceed the difference looked for. Here both services serve the same repository at
once and the cells alternate ABBA, a few seconds each, so a drift hits both alike. Per cell: req/s, p50/p99,
the server process's CPU per request (user + system, from /proc) and its event-loop thread's (the main thread:
where a request's Python runs); the ratios are taken pair by pair. Prints only.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.bodies import image_parts, multipart, multipart_type
from bench.servers import ab_parser, cpu_seconds, free_port, wait_ready
from bench.service_load import wrk_post

ROOT = Path(__file__).resolve().parents[1]


def _start(cwd: Path, models_dir: Path, model: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, LATENTSERVE_MODELS_DIR=str(models_dir.resolve()), LATENTSERVE_LOG_LEVEL="warning",
               LATENTSERVE_DEFAULT_MODEL=model, LATENTSERVE_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_ready(proc, f"http://127.0.0.1:{port}/ready", what=f"the service in {cwd}")
    return proc, port


def _loop_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (the event loop's) so far."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = ab_parser(__doc__.split("\n")[0], ROOT / "models")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--seconds", type=float, default=5.0, help="per cell")
    p.add_argument("--request", choices=["POST /encode", "OIP JSON", "OIP binary"], default="POST /encode",
                   help="the OIP requests carry one MNIST digit to vae-mnist.encoder (bench/oip.py)")
    args = p.parse_args(argv)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    path, body = "/encode", multipart(image_parts([(buf.getvalue(), "d.png")]), "latentservebench",
                                      content_type="image/png")
    headers = {"Content-Type": multipart_type("latentservebench")}
    if args.request != "POST /encode":
        from bench.oip import _bodies

        path, body, headers = _bodies(args)[0][args.request]
    servers = {"this": _start(ROOT, args.models_dir, args.model), "base": _start(args.base, args.models_dir,
                                                                                   args.model)}
    work = Path(tempfile.mkdtemp(prefix="latentserve-ab-"))
    cells: dict[str, list[dict]] = {"this": [], "base": []}
    try:
        for i in range(args.pairs):
            for side in ("this", "base") if i % 2 == 0 else ("base", "this"):
                proc, port = servers[side]
                loop_cpu: list[float] = []

                def cpu(pid: int = proc.pid, loop_cpu: list[float] = loop_cpu) -> float:
                    loop_cpu.append(_loop_cpu_seconds(pid))
                    return cpu_seconds(pid)

                r = wrk_post(f"http://127.0.0.1:{port}{path}", body, headers, args.clients, args.seconds, work,
                             cpu_seconds=cpu)
                r["loop_us"] = 1e6 * (loop_cpu[1] - loop_cpu[0]) / max(r["n"], 1)
                cells[side].append(r)
                print(f"pair {i + 1} {side:4s} {r['rps']:8.1f} req/s  p50 {r['p50']:6.2f} ms  p99 {r['p99']:7.2f} ms  "
                      f"server CPU {r['cpu_us']:5.0f} us/request (loop {r['loop_us']:5.0f})  errors {r['errors']}",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    for side, rs in cells.items():
        print(f"{side}: median {statistics.median(r['rps'] for r in rs):.0f} req/s, p99 "
              f"{statistics.median(r['p99'] for r in rs):.1f} ms, {statistics.median(r['cpu_us'] for r in rs):.0f} us "
              f"of server CPU per request ({statistics.median(r['loop_us'] for r in rs):.0f} on the event loop)")
    for key, what in (("rps", "req/s"), ("cpu_us", "server CPU per request"),
                      ("loop_us", "event-loop CPU per request")):
        ratios = [a[key] / b[key] for a, b in zip(cells["this"], cells["base"], strict=True)]
        print(f"this / base, {what}, per pair: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
