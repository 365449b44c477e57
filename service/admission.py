"""Admission control: one budget of in-flight work shared by every inference endpoint.

A request's cost is the work ONNX Runtime will actually do for it, padding included: the rows of its
calls (GraphRunner.padded_rows), or for the bound graph the decoder rows of its samples (service/bound.py
BoundPlan.cost). A request is admitted while the work in flight plus its own stays within the budget,
and answered 429 with Retry-After otherwise; one larger than the whole budget runs only alone.

While a request that is worth watching (`cancelled_on_disconnect`; service/inference.py watches those
larger than one merged batch) waits for its results, its connection is watched: when the client goes
away, the request is cancelled, and with it every chunk it still has queued (the runner drops
cancelled items unrun). Cheap requests are not watched: a watcher task costs the event loop more
than their work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

from service.metrics import Metrics

T = TypeVar("T")


class BusyError(Exception):
    """The work budget has no room for a request now (answered 429 with Retry-After: service/errors.py)."""


class WorkBudget:
    """Units of work in flight, across all endpoints and models (one event loop: no lock needed)."""

    def __init__(self, capacity: int, retry_after_s: int, metrics: Metrics):
        self.capacity, self.retry_after_s, self.metrics = capacity, retry_after_s, metrics
        self.in_flight = 0
        metrics.work_in_flight.set_function(lambda: self.in_flight)  # read when /metrics renders, not per request

    def acquire(self, cost: int, model: str) -> None:
        if self.in_flight and self.in_flight + cost > self.capacity:
            self.metrics.rejected.labels(model=model, graph="admission").inc()
            raise BusyError(f"the service is busy: {self.in_flight} units of work are in flight and this request "
                            f"needs {cost}, over the budget of {self.capacity}; retry after {self.retry_after_s} s")
        self.in_flight += cost

    def release(self, cost: int) -> None:
        self.in_flight -= cost


async def cancelled_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    task = asyncio.current_task()
    assert task is not None
    state = {"finished": False, "gone": False}

    async def watch() -> None:
        # The body has been read: the next message the server hands the app is http.disconnect.
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - the server's receive failed: nothing to watch
            return
        if not state["finished"]:
            state["gone"] = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work()
    except asyncio.CancelledError:
        if not state["gone"]:
            raise
        task.uncancel()
        raise ClientDisconnect() from None  # answered 499 (service/errors.py); nobody reads it
    finally:
        state["finished"] = True
        watcher.cancel()
