"""ONNX Runtime sessions (one per graph) behind a dynamic micro-batcher; service/runtime.py loads them.

Each graph of each model gets a :class:`GraphRunner`. With batching on, concurrent requests to the
same graph wait in a bounded queue; worker tasks take what is queued (up to `max_batch_size` rows,
waiting at most `max_queue_delay_ms` for more), concatenate it along the batch axis, run ONNX
Runtime once in a thread pool (never on the event loop) and hand each request its rows. When a
merged call fails, its requests are rerun one by one so that one bad request fails alone. A full
queue raises :class:`QueueFullError` (answered 429 with Retry-After).

Identical results, batched or not: some ONNX Runtime kernels (ReduceSum, as in the planar flows and
PPCA's log-likelihood) vectorize differently depending on the batch length or a row's position, which
changes a row's result in the last bits. So every ONNX Runtime call has the same number of rows
(`batch_pad_multiple`, zero-padded; a merged batch is several such calls within one worker turn), and at
warm-up each graph is probed: if a row's result still depends on its neighbours, that graph runs one
row per call. Either way a row's result depends only on the row itself (checked by the tests). The bound
graph's rows are big (an image with a slice of its samples: service/bound.py), so it always runs one
row per call and pads nothing.

Each request can hand the runner a `post` function that runs on its own outputs in the inference
thread (service/postprocess.py): merging, slicing and post-processing never run on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("service.batcher")

# Bound-graph calls of more samples than this shrink ONNX Runtime's arena afterwards. Shrinking costs about
# half of a 1000-sample call (docs/benchmarks.md, "Service: heavy requests"); what a smaller call leaves in
# the arena (a few MB) is reused by the next one.
SHRINK_ABOVE_SAMPLES = 1024


class Rows(dict):
    """One request's outputs (name -> its rows of a merged call); `finite` names the outputs that hold no NaN or
    infinity in the whole call, checked once per call rather than once per request (service/postprocess.py
    `check_finite` skips those)."""

    finite: frozenset[str] = frozenset()


class QueueFullError(Exception):
    def __init__(self, model: str, graph: str, size: int):
        super().__init__(f"the queue of {model}/{graph} is full ({size} requests waiting)")
        self.model, self.graph, self.size = model, graph, size


def session_options(settings: Settings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on a shared CPU
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = settings.ort_cpu_arena
    return so


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    n: int
    cost: int
    key: tuple
    future: asyncio.Future
    post: Callable[[dict[str, np.ndarray]], Any] | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class GraphRunner:
    """One ONNX Runtime session and, with batching on, its queue and worker tasks.

    A request may hand `run` a `post` function: it gets the request's own outputs (name -> rows) and
    runs in the inference thread right after the call, so that request-dependent numpy work (the
    planar flow, the bound's reductions) never runs on the event loop.
    """

    def __init__(self, model: str, role: str, session: ort.InferenceSession, *, settings: Settings,
                 executor: ThreadPoolExecutor, metrics: Metrics, max_cost: int):
        self.model, self.role, self.session = model, role, session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.settings, self.executor, self.metrics = settings, executor, metrics
        self.max_cost = max_cost
        # The bound graph's rows are big (one image with a slice of its samples: service/bound.py), so each
        # of its calls is one row: nothing to pad, and a row's result cannot depend on neighbours it has none of.
        self.pad = 1 if role == "bound" else settings.batch_pad_multiple
        self.rows_per_call = self.pad
        self._shrink = None
        if role == "bound" and settings.ort_cpu_arena:
            # Its large calls hand their memory back to malloc after each (then malloc_trim, service/memory.py),
            # while smaller calls, and the other graphs' calls, keep the arena's speed (SHRINK_ABOVE_SAMPLES).
            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._queue: asyncio.Queue[_Item] | None = None
        self._carry: deque[_Item] = deque()
        self._workers: list[asyncio.Task] = []
        self._inflight = 0
        self._busy = 0  # workers holding a batch (see retire)
        self._retired = False
        self._last_batch = 1  # requests merged into the previous batch (see _collect)
        self._labels = {"model": model, "graph": role}
        self._m_rows = metrics.batch_rows.labels(**self._labels)
        self._m_reqs = metrics.batch_requests.labels(model, role)  # these two on the event loop (LoopFamily)
        self._m_queue = metrics.queue_time.labels(model, role)
        self._m_infer = metrics.inference_time.labels(**self._labels)
        self._m_depth = metrics.queue_depth.labels(**self._labels)

    def padded_rows(self, n: int) -> int:
        """Rows that ONNX Runtime computes for a request of `n` rows run alone (padding included)."""
        return -(-n // self.rows_per_call) * self.rows_per_call

    # -- synchronous core (runs in the thread pool) ------------------------------------------------

    def run_sync(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session on `feeds` (batch axis 0) in calls of exactly `rows_per_call` rows (zero-padded)."""
        t0 = time.perf_counter()
        n = next(iter(feeds.values())).shape[0]
        out, calls = self._call(feeds, self.rows_per_call)
        self._m_infer.observe(time.perf_counter() - t0)
        self._m_rows.observe(n)
        return out

    def _call(self, feeds: dict[str, np.ndarray], P: int) -> tuple[list[np.ndarray], int]:
        n = next(iter(feeds.values())).shape[0]
        padded = -(-n // P) * P
        if padded != n:
            feeds = {k: np.concatenate([v, np.zeros((padded - n, *v.shape[1:]), v.dtype)]) for k, v in feeds.items()}
        options = self._shrink if self._shrink is not None and feeds["eps"].shape[1] > SHRINK_ABOVE_SAMPLES else None
        if padded == P:
            outs = self.session.run(self.output_names, feeds, options)
        else:
            parts = [self.session.run(self.output_names, {k: v[i:i + P] for k, v in feeds.items()}, options)
                     for i in range(0, padded, P)]
            outs = [np.concatenate(o) for o in zip(*parts, strict=True)]
        return ([o[:n] for o in outs] if padded != n else outs), padded // P

    def _run_items(self, items: list[_Item]) -> list[tuple[bool, Any]]:
        """Run `items` as one merged call; per item (ok, its post(outputs) or its outputs, or its error)."""
        if len(items) == 1:
            merged = self.run_sync(items[0].inputs)
        else:
            merged = self.run_sync({k: np.concatenate([it.inputs[k] for it in items]) for k in items[0].inputs})
        finite = frozenset(name for name, o in zip(self.output_names, merged, strict=True) if np.isfinite(o).all())
        results, start = [], 0
        for it in items:
            out = Rows(zip(self.output_names, (o[start:start + it.n] for o in merged), strict=True))
            out.finite = finite
            start += it.n
            try:
                results.append((True, it.post(out) if it.post is not None else out))
            except Exception as e:  # noqa: BLE001 - that request's own failure, handed to it
                results.append((False, e))
        return results

    def probe_rows_per_call(self, example: dict[str, np.ndarray]) -> int:
        """The largest call size (of `pad`, 1) at which a row's result does not depend on its neighbours.

        Runs `example` (hundreds of rows) row by row and in calls of `pad` rows at every offset;
        keeps `pad` when every row comes out bit-identical, else falls back to one row per call.
        """
        P = self.pad
        if P > 1:
            single = [np.concatenate(o) for o in zip(*(self._call({k: v[i:i + 1] for k, v in example.items()}, P)[0]
                                                       for i in range(len(example["x" if "x" in example else "z"]))),
                                                     strict=True)]
            for offset in range(P):
                got, _ = self._call({k: v[offset:] for k, v in example.items()}, P)
                if not all(np.array_equal(a, b[offset:]) for a, b in zip(got, single, strict=True)):
                    log.info("%s/%s: results depend on the batch at %d rows per call; running one row per call",
                             self.model, self.role, P)
                    P = 1
                    break
        self.rows_per_call = P
        return P

    # -- async API ---------------------------------------------------------------------------------

    async def run(self, inputs: dict[str, np.ndarray], cost: int | None = None,
                  post: Callable[[dict[str, np.ndarray]], Any] | None = None) -> Any:
        """Outputs by name for `inputs` (float32, batch axis 0), or `post(outputs)` when given.

        Merged with concurrent calls when batching. Cancelling the caller drops its item if it has not
        run yet (a failed sibling chunk, a client that went away): a worker skips cancelled items.
        """
        n = next(iter(inputs.values())).shape[0]
        # The workers' loop when batching: asyncio.get_running_loop() makes a getpid() system call each time.
        loop = asyncio.get_running_loop() if self._queue is None or self._retired else self._loop
        key = tuple((k, v.shape[1:]) for k, v in inputs.items())
        item = _Item(inputs, n, cost or n, key, loop.create_future(), post)
        if self._queue is None or self._retired:  # batching off (or retired): one call per request, still bounded
            if self._inflight >= self.settings.max_queue_size:
                self.metrics.rejected.labels(**self._labels).inc()
                raise QueueFullError(self.model, self.role, self._inflight)
            self._inflight += 1
            try:
                self._m_reqs.observe(1)
                [(ok, value)] = await loop.run_in_executor(self.executor, self._run_items, [item])
            finally:
                self._inflight -= 1
            if not ok:
                raise value
            return value
        if self._queue.qsize() + len(self._carry) >= self.settings.max_queue_size:
            self.metrics.rejected.labels(**self._labels).inc()
            raise QueueFullError(self.model, self.role, self._queue.qsize())
        self._queue.put_nowait(item)
        return await item.future

    def waiting(self) -> int:
        """Requests queued and not yet taken by a worker."""
        return (self._queue.qsize() if self._queue is not None else 0) + len(self._carry)

    def start(self, workers: int) -> None:
        # The queue-depth gauge reads the queue when /metrics renders rather than counting every request in
        # and out; by a weak reference, so that a retired runner (and its session) can be freed.
        ref = weakref.ref(self)
        self._m_depth.set_function(lambda: runner.waiting() if (runner := ref()) is not None else 0)
        self._queue, self._loop = asyncio.Queue(), asyncio.get_running_loop()
        self._workers = [asyncio.create_task(self._worker(), name=f"batcher-{self.model}-{self.role}-{i}")
                         for i in range(workers)]

    async def retire(self) -> None:
        """Stop batching once what is queued has run: a newer version of the model serves in its place.

        A request that looked its model up before the swap may still call `run` afterwards (it was reading
        its body): it runs alone on this session, which lives as long as such a request holds the runner.
        Nothing is queued from now on, so the workers are cancelled only once every one of them is idle,
        waiting for a first item: no request's item is dropped.
        """
        self._retired = True
        while self._queue is not None and (self._queue.qsize() or self._carry or self._busy):
            await asyncio.sleep(0.005)
        await self.stop()

    async def stop(self) -> None:
        for t in self._workers:
            t.cancel()
        for t in self._workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down
                await t
        self._workers = []

    def _queued(self) -> _Item | None:
        """The next item still wanted among those queued already, else None (items whose caller was cancelled
        are dropped here, unrun). A plain function: it runs once per item merged."""
        while self._carry or not self._queue.empty():
            item = self._carry.popleft() if self._carry else self._queue.get_nowait()
            if not item.future.done():
                return item
        return None

    async def _next(self, timeout: float | None) -> _Item | None:
        """The next item still wanted, waiting at most `timeout` seconds for one (None: as long as it takes)."""
        while (item := self._queued()) is None:
            try:
                item = await (self._queue.get() if timeout is None else asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                return None
            if not item.future.done():
                return item
        return item

    async def _collect(self) -> list[_Item]:
        first = await self._next(None)
        self._busy += 1  # until its results are handed out (_worker)
        batch, cost = [first], first.cost
        deadline = time.perf_counter() + self.settings.max_queue_delay_ms / 1000.0
        # Wait for more requests only under load (the previous batch merged several): a lone client
        # would otherwise pay the whole queue delay on every request for nothing.
        wait = self._last_batch > 1
        skipped: list[_Item] = []
        while cost < self.max_cost:
            item = self._queued()  # whatever is queued already
            if item is None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not wait:
                    break
                item = await self._next(remaining)
                if item is None:
                    break
            if item.key != first.key:
                skipped.append(item)  # another shape (e.g. another S): a later batch
                continue
            if cost + item.cost > self.max_cost:
                skipped.append(item)
                break
            batch.append(item)
            cost += item.cost
        self._carry.extendleft(reversed(skipped))
        self._last_batch = len(batch)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            now = time.perf_counter()
            batch = [it for it in batch if not it.future.done()]  # the caller went away meanwhile
            if not batch:
                self._busy -= 1
                continue
            for it in batch:
                self._m_queue.observe(now - it.enqueued)
            self._m_reqs.observe(len(batch))
            try:
                try:
                    results = await loop.run_in_executor(self.executor, self._run_items, batch)
                except Exception:
                    if len(batch) == 1:
                        raise
                    # Per-request isolation: rerun each request alone; only the failing ones fail.
                    results = []
                    for it in batch:
                        try:
                            results.extend(await loop.run_in_executor(self.executor, self._run_items, [it]))
                        except Exception as e:  # noqa: BLE001 - handed to that request
                            results.append((False, e))
            except asyncio.CancelledError:
                for it in batch:
                    if not it.future.done():
                        it.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - a lone request's failure, handed to it
                results = [(False, exc)]
            for it, (ok, value) in zip(batch, results, strict=True):
                if it.future.done():
                    continue
                if ok:
                    it.future.set_result(value)
                else:
                    it.future.set_exception(value)
            self._busy -= 1
