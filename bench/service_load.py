"""Load test of POST /encode (one 28x28 PNG) on 127.0.0.1: requests/s and p50/p99 latency.

    .venv/bin/python -m bench.service_load --models-dir models --model vae-mnist

Side by side, each in its own uvicorn process with the same server settings: the service with and without
micro-batching, (a) a trivial FastAPI endpoint that takes the upload as FastAPI's `UploadFile` and returns
a constant, (a') the same reading the body as bytes without parsing the form (a stricter ceiling), and (b) a
naive FastAPI endpoint that decodes the PNG and runs the torch model eagerly per request (this file may
import torch; the service never does). Concurrency 1, 8 and 64 clients, driven by wrk when it is
installed (asyncio + httpx otherwise). `--repeats` rounds start every server once per round, in turn,
so that a drift of a shared machine's speed hits all of them alike; the goals of issue 5 are checked on
ratios taken within a round. Also the resident memory of the service process with its models.
Records its section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bodies import image_parts, multipart, multipart_type
from bench.servers import free_port, rss_mb, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def serve(kind: str, port: int, checkpoint: str, model: str) -> None:
    import uvicorn

    from bench.baseline_apps import raw_body_app, torch_app, trivial_app
    from service.server import protocol_class
    from service.settings import Settings

    if kind == "trivial":
        app = trivial_app()
    elif kind == "raw":
        app = raw_body_app()
    elif kind == "torch":
        app = torch_app(checkpoint, model)
    else:
        raise SystemExit(f"unknown app {kind}")
    # The server settings of `python -m service` (service/server.py: its protocol with read deadlines too), so
    # that only the apps differ.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, proxy_headers=False,
                server_header=False, http=protocol_class(Settings()))


def _start(kind: str, args, batching: bool = True) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, LATENTSERVE_MODELS_DIR=str(args.models_dir.resolve()), LATENTSERVE_LOG_LEVEL="warning",
               LATENTSERVE_BATCHING=str(batching).lower(), LATENTSERVE_DEFAULT_MODEL=args.model)
    if kind in ("service", "base"):  # base: the service of another checkout (--base), e.g. before a change
        cmd = [sys.executable, "-m", "service", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "bench.service_load", "--serve", kind, "--port", str(port),
               "--checkpoint", str(args.checkpoint), "--model", args.model]
    cwd = args.base if kind == "base" else ROOT
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready_path = "/ready" if kind in ("service", "base") else "/docs"
    wait_ready(proc, f"http://127.0.0.1:{port}{ready_path}", what=kind)
    return proc, port


async def _load(port: int, png: bytes, clients: int, n_requests: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as c:
        for _ in range(min(clients, 8)):  # warm the connections
            await c.post("/encode", files=[("images", ("d.png", png, "image/png"))])
        stop = time.perf_counter() + seconds

        async def worker():
            nonlocal sent, errors
            while sent < n_requests and time.perf_counter() < stop:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await c.post("/encode", files=[("images", ("d.png", png, "image/png"))])
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies or [float("nan")]) * 1000
    return {"rps": len(lat) / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "n": len(lat), "errors": errors}


WRK_SCRIPT = """
wrk.method = "POST"
%(headers)s
local f = io.open("%(body)s", "rb")
wrk.body = f:read("*all")
f:close()
"""


def _wrk_units(value: str) -> float:
    """wrk's latency ('812.00us', '1.23ms', '2.01s') in milliseconds."""
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    raise ValueError(f"unexpected wrk latency {value!r}")


def wrk_post(url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float, workdir: Path,
             cpu_seconds=None) -> dict:
    """One wrk run POSTing `body` to `url` (one load-generator thread, `clients` connections, after a one-second
    warm-up): req/s, p50/p99 ms, the requests and the errors (non-2xx answers and socket errors); with
    `cpu_seconds` (a function: the server's CPU time so far), also the server's CPU microseconds per request."""
    (workdir / "body.bin").write_bytes(body)
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    (workdir / "post.lua").write_text(WRK_SCRIPT % {"headers": lines, "body": workdir / "body.bin"})
    subprocess.run(["wrk", "-t1", f"-c{clients}", "-d1s", "-s", str(workdir / "post.lua"), url],
                   check=True, capture_output=True)  # warm-up
    cpu0 = cpu_seconds() if cpu_seconds else 0.0
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s",
                          str(workdir / "post.lua"), url], check=True, capture_output=True, text=True).stdout
    cpu = cpu_seconds() - cpu0 if cpu_seconds else None
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))  # wrk pads "1.11s " with a space
    if len(pct) < 2:  # no request completed (every one timed out): no latency distribution to read
        raise RuntimeError(f"wrk measured no latencies at {clients} clients on {url}:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": _wrk_units(pct["50"]),
            "p99": _wrk_units(pct["99"]), "n": n, "errors": errors,
            "cpu_us": None if cpu is None else 1e6 * cpu / max(n, 1)}


def _load_wrk(port: int, png: bytes, clients: int, seconds: float, workdir: Path) -> dict:
    """POST /encode with one PNG upload under wrk."""
    boundary = "latentservebench"
    body = multipart(image_parts([(png, "d.png")]), boundary, content_type="image/png")
    return wrk_post(f"http://127.0.0.1:{port}/encode", body, {"Content-Type": multipart_type(boundary)}, clients,
                    seconds, workdir)


SERVERS = [("service, batching", "service", True), ("service, no batching", "service", False),
           ("trivial FastAPI endpoint", "trivial", True), ("trivial endpoint, raw body", "raw", True),
           ("naive torch endpoint", "torch", True)]


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _cells_table(rows: dict[tuple[str, int], list[dict]], clients: list[int], repeats: int,
                 servers: list[tuple[str, str, bool]]) -> list[str]:
    lines = ["| server | clients | req/s | p50 ms | p99 ms | requests | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, _, _ in servers:
        for c in clients:
            runs = rows[(label, c)]
            rps = [r["rps"] for r in runs]
            spread = f" ({min(rps):.0f}-{max(rps):.0f})" if repeats > 1 else ""
            lines.append(f"| {label} | {c} | {_median(rps):.0f}{spread} | {_median([r['p50'] for r in runs]):.1f} | "
                         f"{_median([r['p99'] for r in runs]):.1f} | {sum(r['n'] for r in runs)} | "
                         f"{sum(r['errors'] for r in runs)} |")
    return lines


def _goals(rows: dict[tuple[str, int], list[dict]], c: int, rss: float) -> list[str]:
    """The issue's goals at `c` clients, each ratio taken within a round (servers run minutes apart drift)."""
    svc, triv, raw, naive = (rows[(label, c)] for label in ("service, batching", "trivial FastAPI endpoint",
                                                             "trivial endpoint, raw body", "naive torch endpoint"))
    share = [a["rps"] / b["rps"] for a, b in zip(svc, triv, strict=True)]
    share_raw = [a["rps"] / b["rps"] for a, b in zip(svc, raw, strict=True)]
    times = [a["rps"] / b["rps"] for a, b in zip(svc, naive, strict=True)]
    p99 = [r["p99"] for r in svc]

    def rng(xs, fmt):
        return "" if len(xs) == 1 else f" (rounds: {', '.join(fmt % x for x in xs)})"

    base = rows.get(("service at --base, batching", c))
    vs_base = [] if base is None else [a["rps"] / b["rps"] for a, b in zip(svc, base, strict=True)]
    return [f"| goal at {c} clients (service, batching) | median over rounds | goal |", "| --- | --- | --- |",
            f"| share of the trivial endpoint's req/s | {100 * _median(share):.0f} %{rng(share, '%.2f')} | >= 70 % |",
            f"| share of the raw-body endpoint's req/s (a stricter ceiling; no goal) | {100 * _median(share_raw):.0f} %"
            f"{rng(share_raw, '%.2f')} | - |",
            f"| multiple of the naive torch endpoint | {_median(times):.1f}x{rng(times, '%.1f')} | >= 3x |",
            f"| p99 latency | {_median(p99):.1f} ms{rng(p99, '%.1f')} | <= 50 ms |",
            f"| resident memory (3 default models loaded) | {rss:.0f} MB | <= 300 MB |"] + (
            [f"| req/s against the service at --base (the code before a change) | {100 * _median(vs_base):.0f} %"
             f"{rng(vs_base, '%.2f')} | no regression beyond noise |"] if vs_base else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="vae-mnist")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the torch checkpoint of --model for the naive torch endpoint (default: runs/MODEL, "
                        "where build-defaults fits it)")
    p.add_argument("--requests", type=int, default=600, help="requests per (server, concurrency) with httpx")
    p.add_argument("--seconds", type=float, default=10.0, help="time per (server, concurrency, round)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds; each starts every server once, in turn, so that a drift of the machine's speed "
                        "hits all of them alike (cells report the median and the range)")
    p.add_argument("--base", type=Path, default=None,
                   help="another checkout (e.g. the code before a change): its service runs alongside in every round")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--httpx", action="store_true", help="use the asyncio + httpx load generator even if wrk is here")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, str(args.checkpoint), args.model)
        return 0
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    import json

    from PIL import Image

    if args.checkpoint is None:
        args.checkpoint = ROOT / "runs" / args.model

    card = json.loads((args.models_dir / args.model / "card.json").read_text())
    H, W = card["image_shape"]
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((H, W)) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    servers = SERVERS + ([("service at --base, batching", "base", True)] if args.base else [])
    rows: dict[tuple[str, int], list[dict]] = {(label, c): [] for label, _, _ in servers for c in args.clients}
    rss: dict[str, float] = {}
    use_wrk = shutil.which("wrk") is not None and not args.httpx
    workdir = Path(tempfile.mkdtemp(prefix="latentserve-load-"))
    generator = ("wrk (1 thread, C)" if use_wrk else "asyncio + httpx (install wrk for a lighter load generator: "
                 "apt-get install wrk)")
    for round_ in range(1, args.repeats + 1):
        for label, kind, batching in servers:
            proc, port = _start(kind, args, batching)
            try:
                for clients in args.clients:
                    if use_wrk:
                        res = _load_wrk(port, png, clients, args.seconds, workdir)
                    else:
                        res = asyncio.run(_load(port, png, clients, args.requests, args.seconds))
                    rows[(label, clients)].append(res)
                    print(f"round {round_}/{args.repeats} {label:26s} c={clients:3d} {res['rps']:8.1f} req/s  "
                          f"p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms  n={res['n']} errors={res['errors']}",
                          flush=True)
                if kind in ("service", "base"):
                    rss[label] = max(rss.get(label, 0.0), rss_mb(proc.pid))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    models = sorted(d.name for d in args.models_dir.iterdir() if (d / "card.json").is_file())
    body = [f"Model `{args.model}` (models loaded: {', '.join(models)}); load generator on the same machine "
            f"({generator}), one uvicorn process per server, {args.seconds:g} s per cell"
            + ("" if use_wrk else f" or {args.requests} requests") + f", {args.repeats} round(s): every server "
            "started once per round, in turn. Cells give the median over rounds (req/s: and the range).", ""]
    body += _cells_table(rows, args.clients, args.repeats, servers)
    body += ["", "Resident memory of the service process after its runs: "
             + ", ".join(f"{k}: {v:.0f} MB" for k, v in rss.items()) + ".", ""]
    body += _goals(rows, max(args.clients), rss["service, batching"])
    text = "\n".join(body)
    from bench.report import publish

    publish(f"Service load (POST /encode, {args.model})", text, module="bench.service_load", save=not args.no_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
