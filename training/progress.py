"""Progress of fits that run in other processes: each fit reports, `build-defaults` shows one line per model.

A fit of build-defaults (a process of its pool, training/defaults.py) reports through the :class:`Reporter` that
`use` sets for its process (`current()`: a silent one otherwise), as events on a queue to its parent (or JSON
lines on a file descriptor):

    {"event": "step", "n": 120, "total": 600, "unit": "epoch", "figures": {"train ELBO": -98.1, ...}}
    {"event": "phase", "phase": "evaluating"}

`expected` joins `total` when the fit stops on a tolerance rather than after `total` steps (PPCA's EM): an
estimate of the step it will stop at. The parent's :class:`Board` shows one bar per model in a terminal
(tqdm), and a plain line per model every `every` seconds otherwise (CI, `docker logs`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

# Steps closer together than this are not all sent (EM runs a dozen iterations a second): the last one is.
MIN_INTERVAL_S = 0.25
PLAIN_EVERY_S = 15.0  # without a terminal: one line per model this often


class Reporter:
    """A fit's side: steps and phases as JSON lines on a file descriptor; does nothing without one.

    `sink` takes each event instead of the file descriptor `fd`. The parent may ask for more threads (the other
    fits are done: the cores are free): `threads()` says how many (None: leave them), or `control` is a file it
    writes `threads N` lines to. The fit then runs on N torch threads from its next step or phase on.
    """

    def __init__(self, fd: int | None = None, control: IO[str] | None = None, *,
                 sink: Callable[[dict], None] | None = None, threads: Callable[[], int | None] | None = None):
        self._file: IO[str] | None = os.fdopen(fd, "w", buffering=1) if fd is not None else None
        self._sink, self._wanted = sink, threads
        self._last_sent = 0.0
        self._pending: dict | None = None
        self._gains: list[tuple[int, float]] = []
        self._threads: int | None = None  # asked for by the parent; applied by the fit's own thread
        self._applied: int | None = None
        if control is not None:
            threading.Thread(target=self._listen, args=(control,), name="fit-control", daemon=True).start()

    def _listen(self, control: IO[str]) -> None:
        for line in control:
            word, _, value = line.partition(" ")
            if word == "threads" and value.strip().isdigit() and int(value) > 0:
                self._threads = int(value)

    def _apply_threads(self) -> None:
        # In the fit's own thread: the number of threads of torch's intra-op pool is set per calling thread.
        if self._wanted is not None:
            self._threads = self._wanted()
        if self._threads is not None and self._threads != self._applied:
            import torch

            torch.set_num_threads(self._threads)
            self._applied = self._threads

    def step(self, n: int, total: int | None, unit: str, *, gain: tuple[float, float] | None = None,
             **figures: float) -> None:
        """Step `n` of at most `total` done, with the figures to show (e.g. train and validation ELBO).

        `gain` = (last step's gain, tolerance) for a fit that stops when its gain falls below the tolerance:
        the stopping step is estimated from the gains' geometric decay (EM converges linearly).
        """
        self._apply_threads()
        if self._file is None and self._sink is None:
            return
        event: dict[str, Any] = {"event": "step", "n": n, "total": total, "unit": unit,
                                 "figures": {k: float(v) for k, v in figures.items()}}
        if gain is not None:
            event["expected"] = self._expected(n, *gain)
        now = time.monotonic()
        if now - self._last_sent < MIN_INTERVAL_S and n != total:
            self._pending = event
            return
        self._send(event)

    def phase(self, name: str) -> None:
        """The fit moved on to `name` (e.g. evaluating its test figures)."""
        self._apply_threads()
        if self._file is None and self._sink is None:
            return
        if self._pending is not None:
            self._send(self._pending)
        self._send({"event": "phase", "phase": name})

    def _expected(self, n: int, gain: float, tol: float) -> int | None:
        if not (gain > 0 and math.isfinite(gain)):
            return None
        self._gains = [g for g in self._gains if g[0] >= n - 50] + [(n, gain)]
        n0, g0 = self._gains[0]
        if n - n0 < 5 or gain >= g0:
            return None
        rate = math.log(gain / g0) / (n - n0)  # log of the gain's ratio per step, < 0
        return n + max(0, math.ceil(math.log(tol / gain) / rate))

    def _send(self, event: dict) -> None:
        self._pending = None
        self._last_sent = time.monotonic()
        try:
            if self._sink is not None:
                self._sink(event)
            else:
                self._file.write(json.dumps(event) + "\n")  # type: ignore[union-attr]
        except (OSError, ValueError):  # the parent went away: fit on, silently
            self._file, self._sink = None, None


_current = Reporter()  # this process's fit reports here (one fit at a time per process: training/defaults.py)


def use(reporter: Reporter) -> None:
    """Make `reporter` the one the fit of this process reports to (build-defaults' pool does it per fit)."""
    global _current
    _current = reporter


def current() -> Reporter:
    """The Reporter of the fit running in this process (a silent one outside build-defaults)."""
    return _current


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class _Model:
    def __init__(self, name: str):
        self.name = name
        self.phase = "waiting"
        self.started: float | None = None
        self.first: tuple[float, int] | None = None  # (time, n) of the first step seen
        self.n, self.total, self.expected, self.unit = 0, None, None, "step"
        self.figures: dict[str, float] = {}
        self.done = False

    def fraction(self) -> float | None:
        total = self.expected or self.total
        return min(1.0, self.n / total) if total else None

    def eta(self, now: float) -> float | None:
        total = self.expected or self.total
        if self.phase != "fitting" or not total or self.first is None or self.n <= self.first[1]:
            return None
        t0, n0 = self.first
        return (now - t0) / (self.n - n0) * max(0, total - self.n)

    def line(self, now: float) -> str:
        parts = [self.phase]
        if self.phase == "fitting" and self.first is not None:
            total = f"/{self.total}" if self.total else ""
            if self.expected and self.expected != self.total:
                total = f"/~{self.expected} (at most {self.total})"
            parts = [f"{self.unit} {self.n}{total}"]
            parts += [f"{k} {v:.2f}" for k, v in self.figures.items()]
        if self.started is not None:
            parts.append(f"{_clock(now - self.started)} elapsed")
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        return ", ".join(parts)


class Board:
    """The parent's side: one bar per model in a terminal, else a plain line per model every `every` seconds.

    Thread-safe: each fit's reader thread calls `event`; `write` prints a line above the bars.
    """

    def __init__(self, names: list[str], *, live: bool | None = None, every: float | None = None,
                 stream: IO[str] | None = None, prefix: str = "[build-defaults] "):
        self.stream = stream or sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.every, self.prefix = PLAIN_EVERY_S if every is None else every, prefix
        self.models = {n: _Model(n) for n in names}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._bars: dict[str, Any] = {}
        width = max(map(len, names), default=0)
        if self.live:
            from tqdm import tqdm

            # A terminal whose size is unknown says 0 x 0, and tqdm then hides every bar.
            size = shutil.get_terminal_size((120, 24))
            columns, rows = size.columns or 120, max(size.lines, len(names) + 2)

            class Bar(tqdm):
                text = "waiting"

                @property
                def format_dict(self):  # `text` for the bar format (tqdm's postfix starts with a comma)
                    return {**super().format_dict, "text": self.text}

            for i, name in enumerate(names):
                self._bars[name] = Bar(total=1, position=i, file=self.stream, leave=True, ncols=columns, nrows=rows,
                                       desc=name.ljust(width), bar_format="{desc} {percentage:3.0f}%|{bar:20}| {text}")
        self._ticker = threading.Thread(target=self._tick, name="progress-board", daemon=True)
        self._ticker.start()

    # -- what the fits report -----------------------------------------------------------------------

    def start(self, name: str) -> None:
        with self._lock:
            m = self.models[name]
            m.phase, m.started = "starting", time.monotonic()  # "fitting" from its first step
            self._show(m, announce=False)

    def event(self, name: str, event: dict) -> None:
        with self._lock:
            m = self.models[name]
            if event.get("event") == "step":
                now = time.monotonic()
                m.n, m.total, m.unit = int(event["n"]), event.get("total"), event.get("unit", "step")
                m.expected = event.get("expected")
                m.figures = event.get("figures", {})
                if m.first is None:
                    m.first, m.phase = (now, m.n), "fitting"
                self._show(m, announce=False)
            elif event.get("event") == "phase":
                self.phase(name, str(event["phase"]))

    def phase(self, name: str, phase: str, *, done: bool = False) -> None:
        """`name` moved on to `phase`: shown at once (a line of its own without a terminal)."""
        with self._lock:
            m = self.models[name]
            m.phase, m.done = phase, done or m.done
            self._show(m, announce=True)

    def write(self, line: str) -> None:
        """A line of text above the bars (or between the plain lines)."""
        with self._lock:
            if self.live:
                from tqdm import tqdm

                tqdm.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()

    # -- display ----------------------------------------------------------------------------------

    def _show(self, m: _Model, *, announce: bool) -> None:
        now = time.monotonic()
        bar = self._bars.get(m.name)
        if bar is not None:
            fraction = 1.0 if m.done else m.fraction()
            bar.n = fraction if fraction is not None else 0
            bar.text = m.line(now)
            bar.refresh()
        elif announce:
            print(f"{self.prefix}{m.name}: {m.line(now)}", file=self.stream, flush=True)

    def _tick(self) -> None:
        last_plain = time.monotonic()
        while not self._stop.wait(min(1.0, self.every)):
            with self._lock:
                now = time.monotonic()
                if self.live:
                    for m in self.models.values():  # elapsed and ETA move between reports too
                        if m.started is not None and not m.done:
                            self._show(m, announce=False)
                elif now - last_plain >= self.every:
                    last_plain = now
                    for m in self.models.values():
                        if m.started is not None and not m.done:
                            print(f"{self.prefix}{m.name}: {m.line(now)}", file=self.stream, flush=True)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
