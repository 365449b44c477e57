"""What one POST /encode costs the event loop, without HTTP: microseconds of loop-thread CPU per request.

    .venv/bin/python -m bench.service_app_cost --models-dir models --model vae-mnist

Calls each app as ASGI directly (no sockets, no uvicorn) from `--clients` concurrent callers, the
same 28x28 PNG upload as bench/service_load.py: the service (with micro-batching), the trivial FastAPI
endpoint and the raw-body endpoint of bench/baseline_apps.py. The figure is the CPU time of the thread
that runs the event loop, divided by the requests: on a shared machine it drifts far less than
requests/s do, and the loop is what limits the service's throughput (ONNX Runtime runs off it).
Rounds alternate the apps; cells give the median. Records its section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path

import numpy as np

from bench.bodies import image_parts, multipart, multipart_type

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "latentservebench"


def upload(png: bytes) -> tuple[bytes, dict]:
    """The multipart body and the ASGI scope of POST /encode with one image."""
    body = multipart(image_parts([(png, "d.png")]), BOUNDARY, content_type="image/png")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/encode", "raw_path": b"/encode", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"),
                         (b"content-type", multipart_type(BOUNDARY).encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    return body, scope


async def loop_cpu_per_request(app, body: bytes, scope: dict, requests: int, clients: int) -> float:
    """Loop-thread CPU microseconds per request, `requests` spread over `clients` concurrent callers."""
    statuses: set[int] = set()

    async def one() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.add(message["status"])

        await app({**scope, "headers": list(scope["headers"])}, receive, send)

    async def caller(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(50):  # warm-up
        await one()
    per = requests // clients
    t0 = time.thread_time()
    await asyncio.gather(*(caller(per) for _ in range(clients)))
    cpu = time.thread_time() - t0
    if statuses != {200}:
        raise RuntimeError(f"expected only 200 answers, got {sorted(statuses)}")
    return cpu / (per * clients) * 1e6


async def measure(args) -> dict[str, list[float]]:
    from PIL import Image

    from bench.baseline_apps import raw_body_app, trivial_app
    from service.app import create_app
    from service.settings import Settings

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    body, scope = upload(buf.getvalue())
    service = create_app(Settings(models_dir=args.models_dir, default_model=args.model, log_level="warning"))
    apps = {"service, batching": service, "trivial FastAPI endpoint": trivial_app(),
            "trivial endpoint, raw body": raw_body_app()}
    figures: dict[str, list[float]] = {name: [] for name in apps}
    async with service.router.lifespan_context(service):
        while not service.state.runtime.ready:
            if service.state.loading_task.done():
                raise RuntimeError(f"the service did not load its models: {service.state.runtime.load_error}")
            await asyncio.sleep(0.05)
        for round_ in range(1, args.repeats + 1):
            for name, app in apps.items():
                us = await loop_cpu_per_request(app, body, scope, args.requests, args.clients)
                figures[name].append(us)
                print(f"round {round_}/{args.repeats} {name:28s} {us:7.1f} us of loop CPU per request", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="vae-mnist")
    p.add_argument("--requests", type=int, default=6400, help="requests per app and round")
    p.add_argument("--clients", type=int, default=64, help="concurrent callers")
    p.add_argument("--repeats", type=int, default=5, help="rounds, each running every app once")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    for name in ("requests", "clients", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    figures = asyncio.run(measure(args))
    svc = float(np.median(figures["service, batching"]))
    lines = [f"Model `{args.model}`, one 28x28 PNG per request, {args.clients} concurrent callers, {args.requests} "
             f"requests per app and round, {args.repeats} rounds; median (range) of loop-thread CPU per request.",
             "", "| app | us per request | the service costs, in units of this app |", "| --- | --- | --- |"]
    for name, xs in figures.items():
        med = float(np.median(xs))
        lines.append(f"| {name} | {med:.0f} ({min(xs):.0f}-{max(xs):.0f}) | {svc / med:.2f}x |")
    text = "\n".join(lines)
    from bench.report import publish

    publish("Service cost per request on the event loop (POST /encode, no HTTP)", text,
            module="bench.service_app_cost", save=not args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
