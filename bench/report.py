"""Record a benchmark's figures in docs/benchmarks.md: one section per benchmark, replaced on re-run.

    from bench.report import machine, record
    record("PPCA fitting", body_markdown, command="python -m bench.ppca")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures measured by the scripts under `bench/`; each section says how to reproduce it.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for mod in ("torch", "onnxruntime", "numpy"):
        with contextlib.suppress(ImportError):
            versions.append(f"{mod} {__import__(mod).__version__}")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, " + ", ".join(versions)


def record(title: str, body: str, *, command: str, doc: Path = DOC) -> None:
    """Write (or replace) the section `## title` with the command, machine, date and `body`."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"## {title}\n\n- command: `{command}`\n- machine: {machine()}\n- date: {date}\n\n"
               f"{body.strip()}\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text.rstrip("\n") + "\n")


def publish(title: str, body: str, *, module: str, save: bool = True) -> None:
    """Print `body`; when `save`, record it with the command that ran this module (`python -m module ...`)."""
    print(body)
    if save:
        record(title, body, command=f".venv/bin/python -m {module} " + " ".join(sys.argv[1:]))


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats keep 4 significant decimals unless already formatted."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
