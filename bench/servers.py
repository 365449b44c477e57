"""Servers for the benches: a free port on 127.0.0.1, waiting until a server answers 200, and a process's resident
memory and CPU time from /proc (NaN once it is gone)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180.0, what: str = "the server") -> None:
    """Poll GET `url` until it answers 200. RuntimeError when `proc` exits first or `timeout` seconds pass (then
    `proc` is killed)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready ({url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} was not ready within {timeout:g} s ({url})")


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of process `pid` in MB; NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (every thread); NaN when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def ab_parser(description: str, default_models_dir: Path):
    """The arguments every this-against-another-checkout bench takes: --base, --models-dir, --model, --clients."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. the code before a change)")
    p.add_argument("--models-dir", type=Path, default=default_models_dir)
    p.add_argument("--model", default="vae-mnist")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    return p
