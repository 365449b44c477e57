"""Hot swap under load: 64 clients on POST /encode while the served folder is replaced by fresh exports.

    .venv/bin/python -m bench.service_swap --model vae-mnist          # runs/vae-mnist -> exports; wrk on 127.0.0.1

First `--swaps` fresh exports of the model's checkpoint (`runs/NAME`, training/export.py) are made into a scratch
folder beside a scratch repository. One `python -m service` serves that repository, polling it every `--poll` s.
Each round runs wrk (one thread, `--clients` connections) twice on that same process: without swaps, then while
the served folder is replaced `--swaps` times, every `--every` s, by the next export (renamed into place as the
training code does it: training/staging.py), each swap waited for until the service serves it. Records the
errors (non-2xx answers and socket errors), requests/s, p50 and p99 of both runs side by side, and the service's
resident memory before the rounds, after each swap and after each round. Needs wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.report import publish
from bench.servers import free_port, rss_mb
from bench.service_load import ROOT, _load_wrk


def _prepare(args, scratch: Path) -> list[Path]:
    """`--swaps` fresh exports of the checkpoint, each a complete folder ready to be renamed into place."""
    from training.export import export_checkpoint

    exports = []
    for i in range(args.swaps + 1):
        out = scratch / f"export-{i}"
        t0 = time.perf_counter()
        export_checkpoint(args.checkpoint, out, name=args.model)
        print(f"export {i + 1}/{args.swaps + 1}: {time.perf_counter() - t0:.1f} s", flush=True)
        exports.append(out)
    return exports


def _served_version(port: int, model: str) -> tuple[str | None, str | None]:
    """The `created` stamp of the card the service serves, and the failure GET /models shows for the model."""
    import httpx

    body = httpx.get(f"http://127.0.0.1:{port}/models", timeout=10).json()
    card = next((m for m in body["models"] if m["name"] == model), None)
    created = httpx.get(f"http://127.0.0.1:{port}/models/{model}", timeout=10).json()["card"]["created"] \
        if card else None
    return created, body["unavailable"].get(model)


def _swapper(args, sources: list[Path], scratch: Path, target: Path, port: int, pid: int,
             rss: list[float], seconds: list[float], errors: list[BaseException]) -> None:
    """Replace `target` by each of `sources` in turn, every `args.every` s, waiting until the service serves it
    (its card's `created` stamp: the exports were made seconds apart)."""
    from training.staging import publish as publish_folder

    try:
        time.sleep(1.0 + 1.5)  # wrk's 1 s warm-up, then into the measured run
        for source in sources:
            t0 = time.perf_counter()
            created = json.loads((source / "card.json").read_text())["created"]
            staged = scratch / f".swap-{time.monotonic_ns()}"
            shutil.copytree(source, staged, copy_function=os.link)  # a new folder of that export's files
            publish_folder(staged, target)
            while (got := _served_version(port, args.model))[0] != created:
                if got[1]:
                    raise RuntimeError(f"the new version failed to load: {got[1]}")
                time.sleep(0.05)
            seconds.append(time.perf_counter() - t0)
            rss.append(rss_mb(pid))
            time.sleep(max(0.0, args.every - (time.perf_counter() - t0)))
    except BaseException as e:  # noqa: BLE001 - reported by the caller
        errors.append(e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.service_swap", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vae-mnist")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: runs/MODEL")
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--every", type=float, default=2.5, help="seconds between two swaps")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--poll", type=float, default=0.5, help="the service's LATENTSERVE_REPOSITORY_POLL_SECONDS")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or ROOT / "runs" / args.model
    if shutil.which("wrk") is None:
        p.error("needs wrk (apt-get install wrk)")
    from PIL import Image

    scratch = Path(tempfile.mkdtemp(prefix="latentserve-swap-"))
    repo = scratch / "models"
    exports = _prepare(args, scratch)
    shutil.copytree(exports[0], repo / args.model)
    card = json.loads((repo / args.model / "card.json").read_text())
    buf = io.BytesIO()
    H, W = card["image_shape"]
    Image.fromarray((np.random.default_rng(0).random((H, W)) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()

    port, log = free_port(), scratch / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    env.update(LATENTSERVE_MODELS_DIR=str(repo), LATENTSERVE_LOG_LEVEL="warning", LATENTSERVE_DEFAULT_MODEL=args.model,
               LATENTSERVE_REPOSITORY_POLL_SECONDS=str(args.poll))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit(f"the service did not start:\n{log.read_text()[-2000:]}")

    rss_start = rss_mb(proc.pid)
    seconds = args.swaps * args.every + 8  # per wrk run: every swap falls inside it
    rows: dict[str, list[dict]] = {"no swaps": [], "swaps": []}
    rss_after_swap: list[list[float]] = []
    rss_after_round: list[float] = []
    swap_seconds: list[float] = []
    n_export = 1
    try:
        for round_ in range(1, args.rounds + 1):
            res = _load_wrk(port, png, args.clients, seconds, scratch)
            rows["no swaps"].append(res)
            print(f"round {round_} no swaps: {res}", flush=True)
            rss_round: list[float] = []
            swapper_error: list[BaseException] = []
            sources = [exports[(n_export + i) % len(exports)] for i in range(args.swaps)]
            n_export += args.swaps
            t = threading.Thread(target=_swapper, args=(args, sources, scratch, repo / args.model, port, proc.pid,
                                                        rss_round, swap_seconds, swapper_error))
            t.start()
            res = _load_wrk(port, png, args.clients, seconds, scratch)
            t.join()
            if swapper_error:
                raise swapper_error[0]
            rows["swaps"].append(res)
            rss_after_swap.append(rss_round)
            time.sleep(2.0)
            rss_after_round.append(rss_mb(proc.pid))
            print(f"round {round_} swaps: {res}; RSS after each swap {[round(r) for r in rss_round]} MB", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    with open(log, "rb") as f:
        failures = sum(line.count(b"not reloading model folder") for line in f)

    lines = [f"Model `{args.model}`; {args.swaps + 1} fresh exports of `runs/{args.checkpoint.name}` made "
             f"first; one `python -m service` (default settings, log level warning, repository polled every "
             f"{args.poll:g} s) under wrk (1 thread, {args.clients} connections, POST /encode of one {H}x{W} PNG) "
             f"for {seconds:g} s per run; each round: a run without swaps, then a run during which the served "
             f"folder is replaced {args.swaps} times, every {args.every:g} s, by the next export (a new folder renamed "
             "into place with RENAME_EXCHANGE, training/staging.py), each swap waited for until GET /models/NAME "
             f"shows the new card. {args.rounds} rounds; the ratios are taken within a round (the two runs are a "
             "minute apart; the machine's speed drifts more than that over the rounds).", "",
             "| round | run | req/s | p50 ms | p99 ms | requests | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i in range(args.rounds):
        for run in rows:
            r = rows[run][i]
            lines.append(f"| {i + 1} | {run} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['n']} | "
                         f"{r['errors']} |")
    ratio = {k: [b[k] / a[k] for a, b in zip(rows["no swaps"], rows["swaps"], strict=True)] for k in ("rps", "p50",
                                                                                                        "p99")}
    lines += ["", "- with swaps / without, per round: " + "; ".join(
                  f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in ratio.items()),
              f"- swaps: {len(swap_seconds)}, errors during them: {sum(r['errors'] for r in rows['swaps'])}; each new "
              f"version served {np.median(swap_seconds):.2f} s after its rename (median; max {max(swap_seconds):.2f} "
              f"s; polling included); failed reloads: {failures}",
              f"- resident memory of the service: {rss_start:.0f} MB after start; after each swap, round by round: "
              + "; ".join(", ".join(f"{r:.0f}" for r in rr) for rr in rss_after_swap)
              + f" MB; 2 s after each round: {', '.join(f'{r:.0f}' for r in rss_after_round)} MB"]
    publish(f"Service: hot swap under load (POST /encode, {args.model})", "\n".join(lines),
            module="bench.service_swap", save=not args.no_report)
    shutil.rmtree(scratch, ignore_errors=True)
    errors = sum(r["errors"] for r in rows["swaps"])
    return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())
