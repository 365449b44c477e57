"""Fresh-clone timings of `scripts/run`: seconds to the first POST /encode answered 200 (install included), and until
every default model is served.

    .venv/bin/python -m bench.first_run                 # clones HEAD of this checkout into a scratch folder

Clones the checkout (`git clone --no-local`: no .venv, models/ or runs/ come along) into a scratch folder, starts
`scripts/run --port P` there with no LATENTSERVE_ variable set, and times from that start: the first line the
command's launcher or service prints (the install is done then), the service's first answer (/health), the first
POST /encode (one 28x28 PNG, default model) answered 200, and the moment GET /models lists each default model.
The machine's load average is recorded at the start and the end (on a shared machine the other jobs' load is
part of the figures). Then SIGTERM, and the scratch folder is removed (--keep keeps it).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import publish
from bench.servers import free_port
from bench.service_load import ROOT

DEFAULTS = ("ppca-mnist", "flow-vae-mnist", "vae-mnist")


def _launched(log: Path) -> bool:
    """Whether scripts/run has got past the install: a line of the launcher, build-defaults or the service."""
    with open(log, "rb") as f:
        return any(line.startswith((b"[run]", b"[build-defaults]", b"INFO:", b"{")) for line in f)


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="HEAD", help="the commit of this checkout to clone")
    p.add_argument("--timeout", type=float, default=30 * 60, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the scratch clone")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    import httpx
    from PIL import Image

    scratch = Path(tempfile.mkdtemp(prefix="latentserve-first-run-"))
    clone = scratch / "latentserve"
    commit = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-local", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "--quiet", commit], cwd=clone, check=True)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(buf, "PNG")
    files = [("images", ("digit.png", buf.getvalue(), "image/png"))]

    port, log = free_port(), scratch / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_") and k != "VIRTUAL_ENV"}
    load_start = _load()
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["scripts/run", "--port", str(port)], cwd=clone, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    marks: dict[str, float] = {}
    try:
        with httpx.Client(base_url=url, timeout=5) as c:
            while time.monotonic() - t0 < args.timeout and proc.poll() is None:
                now = time.monotonic() - t0
                if "output" not in marks and _launched(log):
                    marks["output"] = now
                try:
                    if "health" not in marks and c.get("/health").status_code == 200:
                        marks["health"] = now
                    if "health" in marks and "encode" not in marks and \
                            c.post("/encode", files=files).status_code == 200:
                        marks["encode"] = time.monotonic() - t0
                    if "encode" in marks:
                        served = {m["name"] for m in c.get("/models").json()["models"]}
                        for name in served & set(DEFAULTS):
                            marks.setdefault(name, time.monotonic() - t0)
                except httpx.HTTPError:
                    pass
                if all(n in marks for n in DEFAULTS):
                    break
                time.sleep(0.5)
    finally:
        load_end = _load()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    text = log.read_text(errors="replace")
    fits = dict(re.findall(r"\[build-defaults\] (\S+): fitted in (\d+) s", text))
    missing = [n for n in ("output", "health", "encode", *DEFAULTS) if n not in marks]
    if missing:
        print(text[-4000:])
        raise SystemExit(f"scripts/run did not get to {missing} within {args.timeout:g} s (log: {log})")

    def mmss(s: float) -> str:
        return f"{s:.0f} s ({int(s) // 60} min {int(s) % 60:02d} s)"

    body = "\n".join([
        f"`scripts/run --port P` in a fresh `git clone` of commit {commit[:10]} (no .venv, models/ or runs/), "
        f"pip installing from this machine's local package index; times from the start of the command. Load average "
        f"(1, 5, 15 min) at the start: {load_start}; at the end: {load_end} (2 cores; a shared machine: other jobs' "
        "load is part of these figures).", "",
        "| moment | seconds | goal |", "| --- | --- | --- |",
        f"| install done (the first line of the launcher or the service) | {marks['output']:.0f} | |",
        f"| the service answers (/health) | {marks['health']:.0f} | |",
        f"| first POST /encode answered 200 (ppca-mnist) | {mmss(marks['encode'])} | <= 180 s |",
        *(f"| {n} served | {mmss(marks[n])} | |" for n in DEFAULTS),
        f"| all three served | {mmss(max(marks[n] for n in DEFAULTS))} | <= 11 min |", "",
        "Fit times as build-defaults reports them (fit and test figures, before the export): "
        + ", ".join(f"{n} {fits[n]} s" for n in DEFAULTS if n in fits) + ".",
    ])
    publish("First run: scripts/run from a fresh clone", body, module="bench.first_run", save=not args.no_report)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"kept {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
