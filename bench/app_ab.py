"""This checkout's app against another checkout's, in process (no HTTP): CPU per request, side by side.

    .venv/bin/python -m bench.app_ab --base ../before --models-dir models [--rounds 8]

Two worker processes, one importing each checkout's `service`, each drive their app as ASGI from 64
concurrent callers (bench/service_app_cost.py's harness) with the same requests: POST /encode with one
28x28 PNG (vae-mnist), and where the checkout has /v2, the same MNIST digit as an OIP JSON and an OIP
binary infer request (bench/oip.py's bodies). Per cell: the event-loop thread's CPU per request and the whole
process's (the inference threads too). Cells alternate ABBA between the workers, so a drift of the shared
machine hits both alike; the ratios are taken cell pair by cell pair. CPU time drifts far less than req/s.
Prints, and records a section in docs/benchmarks.md unless --no-report.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.servers import ab_parser

ROOT = Path(__file__).resolve().parents[1]


def _bodies() -> dict[str, tuple[str, bytes, dict[str, str]]]:
    import numpy as np
    from PIL import Image

    from bench.oip import _bodies as oip_bodies
    from bench.service_app_cost import upload

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    body, scope = upload(buf.getvalue())
    headers = {k.decode(): v.decode() for k, v in scope["headers"] if k == b"content-type"}
    oip, _ = oip_bodies(None)
    return {"POST /encode (PNG)": ("/encode", body, headers), "OIP JSON": oip["OIP JSON"][:3],
            "OIP binary": oip["OIP binary"][:3]}


def _scope(path: str, body: bytes, headers: dict[str, str]) -> dict:
    p, _, q = path.partition("?")
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": p, "raw_path": p.encode(), "query_string": q.encode(), "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode()),
                        *((k.lower().encode(), v.encode()) for k, v in headers.items())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}


async def _worker(models_dir: Path, model: str, requests: int, clients: int) -> None:
    """Serve cells on stdin: a line naming a kind -> a JSON line {loop_us, process_us} (or {missing: true})."""
    import service
    from service.app import create_app
    from service.settings import Settings

    if not service.__file__.startswith(str(sys.path[0])):
        raise RuntimeError(f"the worker for {sys.path[0]} imported {service.__file__}")
    app = create_app(Settings(models_dir=models_dir, default_model=model, log_level="warning"))
    bodies = _bodies()
    async with app.router.lifespan_context(app):
        while not app.state.runtime.ready:
            await asyncio.sleep(0.05)
        answers: dict[str, set[int]] = {}

        async def one(kind: str) -> None:
            path, body, headers = bodies[kind]
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                return messages.pop() if messages else {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.start":
                    answers.setdefault(kind, set()).add(message["status"])

            await app(_scope(path, body, headers), receive, send)

        for kind in bodies:  # warm-up, and which kinds this checkout serves
            for _ in range(50):
                await one(kind)
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        while kind := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            if answers[kind] != {200}:
                print(json.dumps({"missing": True}), flush=True)
                continue

            async def caller(n: int, kind: str = kind) -> None:
                for _ in range(n):
                    await one(kind)

            per = requests // clients
            t0, p0 = time.thread_time(), time.process_time()
            await asyncio.gather(*(caller(per) for _ in range(clients)))
            t1, p1 = time.thread_time(), time.process_time()
            if answers[kind] != {200}:
                raise RuntimeError(f"{kind}: expected only 200 answers, got {sorted(answers[kind])}")
            n = per * clients
            print(json.dumps({"loop_us": 1e6 * (t1 - t0) / n, "process_us": 1e6 * (p1 - p0) / n}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = ab_parser(__doc__.split("\n")[0], ROOT / "models")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--requests", type=int, default=6400, help="requests per cell")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: serve cells for this checkout
    args = p.parse_args(argv)
    if args.worker is not None:
        sys.path.insert(0, str(args.worker))  # that checkout's `service` (bench/ stays this one's: already imported)
        for name in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
            del sys.modules[name]
        asyncio.run(_worker(args.models_dir, args.model, args.requests, args.clients))
        return 0
    sides = {"this": ROOT, "base": args.base.resolve()}
    workers = {}
    for side, checkout in sides.items():
        workers[side] = subprocess.Popen(
            [sys.executable, "-m", "bench.app_ab", "--base", str(checkout), "--worker", str(checkout), "--models-dir",
             str(args.models_dir.resolve()), "--model", args.model, "--requests", str(args.requests), "--clients",
             str(args.clients)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for side, w in workers.items():
            if json.loads(w.stdout.readline() or "{}").get("ready") is not True:
                raise SystemExit(f"the {side} worker did not start")
        cells: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for kind in _bodies():
                for side in ("this", "base") if r % 2 == 0 else ("base", "this"):
                    workers[side].stdin.write(kind + "\n")
                    workers[side].stdin.flush()
                    cell = json.loads(workers[side].stdout.readline())
                    cells.setdefault((side, kind), []).append(cell)
                    if not cell.get("missing"):
                        print(f"round {r + 1} {kind:20s} {side:4s} loop {cell['loop_us']:6.1f} us  process "
                              f"{cell['process_us']:6.1f} us per request", flush=True)
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait(60)
    lines = ["| request | this: loop / process us | base: loop / process us | this / base loop, per pair | "
             "this / base process, per pair |", "| --- | --- | --- | --- | --- |"]
    for kind in _bodies():
        a, b = cells[("this", kind)], cells[("base", kind)]
        med = [f"{statistics.median(c[k] for c in x):.0f}" for x in (a, b) for k in ("loop_us", "process_us")
               if not x[0].get("missing")]
        if b[0].get("missing"):
            lines.append(f"| {kind} | {med[0]} / {med[1]} | (not served) | - | - |")
            continue
        ratios = [[x[k] / y[k] for x, y in zip(a, b, strict=True)] for k in ("loop_us", "process_us")]
        lines.append(f"| {kind} | {med[0]} / {med[1]} | {med[2]} / {med[3]} | " + " | ".join(
            f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})" for r in ratios) + " |")
    base_rev = subprocess.run(["git", "-C", str(sides["base"]), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    text = (f"Model `{args.model}`, {args.clients} concurrent callers, {args.requests} requests per cell, "
            f"{args.rounds} rounds (ABBA); base: {base_rev or sides['base']}. Medians over rounds; ratios per pair of "
            "cells (median and range).\n\n" + "\n".join(lines))
    from bench.report import publish

    publish("Service CPU per request against the code before (in process, no HTTP)", text, module="bench.app_ab",
            save=not args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
