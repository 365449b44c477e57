"""Giving memory back to the system after large requests (glibc's malloc_trim).

A large request (thousands of decoder rows) makes ONNX Runtime and numpy allocate tens of megabytes
at once. ONNX Runtime's arena would keep it for good, so the bound graph's calls (the large ones) shrink
the arena after each call (service/runtime.py); the memory then goes back to glibc, which keeps freed
memory in its arenas (one per thread that allocated, up to 8 x cores): the process would stay at its
peak long after the request. After a request whose work is at least `trim_after_work`, `malloc_trim(0)`
runs in a worker thread and hands every free page back. Which of these brings resident memory back
to its baseline, measured against MALLOC_ARENA_MAX and without trimming: docs/benchmarks.md ("Service
memory"). Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from concurrent.futures import Executor

log = logging.getLogger("service.memory")


def _load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class Trimmer:
    """Runs malloc_trim(0) in `executor` after large requests, one at a time."""

    def __init__(self, executor: Executor, min_work: int):
        self.executor, self.min_work = executor, min_work
        self._trim = _load_trim() if min_work > 0 else None
        self._running = False

    def after(self, work: int) -> None:
        """Called when a request of `work` units is done: trim soon if it was large (and no trim is running)."""
        if work >= self.min_work:
            self.soon()

    def soon(self) -> None:
        """Trim in the executor now, unless a trim is running already (called after large bodies too)."""
        if self._trim is None or self._running:
            return
        self._running = True
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._trim, 0)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self._running = False
        if not future.cancelled() and future.exception() is not None:
            log.warning("malloc_trim failed: %s", future.exception())
