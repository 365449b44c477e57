"""The default model set served by `scripts/run` and docker compose, built on the embedded data.

    python -m training build-defaults --models-dir models

Each model is fitted on the 4,000 training rows of the `mnist5k-bin` split (ppca on the same rows,
continuous), so its card's test figures are honest figures on the 1,000 test rows. A model whose
folder is already there and valid is skipped; a broken one is rebuilt. Every model is exported into
a hidden folder beside its target and renamed into place once its card validates
(training/staging.py), so a service polling the repository never sees a half-written model: it
serves each model as soon as its export lands.

With `jobs` > 1 the fits run in a pool of that many spawned processes, each reporting its progress on a
queue (training/progress.py): one bar per model in a terminal, a plain line per model every `every` seconds
otherwise. A fit that fails shows its error; the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

from model_repository.card import ModelRepositoryError, load_model_card
from training import progress
from training.config import DataOptions, FitJob
from training.export import export_checkpoint
from training.fitting import fit
from training.progress import Board, Reporter
from training.train_ppca import PPCAFit
from training.train_vae import VAEFit

log = logging.getLogger(__name__)

# name -> its fit. The VAE settings are the fit defaults: the quality models of docs/benchmarks.md. Fitted in
# this order, `jobs` at a time: ppca first, the quickest, to be served within a minute or two; then the longest,
# flow-vae, so that it starts at once beside ppca, and vae takes ppca's place when it is done (all three are
# done sooner than in any other order).
DEFAULT_MODELS: dict[str, FitJob] = {
    # PPCA selects nothing on validation rows, so it is fitted on all 4,000 training rows.
    "ppca-mnist": FitJob("ppca", PPCAFit(method="em", latent_dim=40), DataOptions("mnist5k", valid_fraction=0.0)),
    "flow-vae-mnist": FitJob("flow-vae", VAEFit(), DataOptions("mnist5k-bin")),
    "vae-mnist": FitJob("vae", VAEFit(), DataOptions("mnist5k-bin")),
}
_pools: set[ProcessPoolExecutor] = set()  # the pools of fits now running (stop_fits)


class FitError(RuntimeError):
    """A default model's fit failed, and how."""


def model_is_valid(path: Path, kind: str) -> bool:
    try:
        card = load_model_card(path)
    except ModelRepositoryError as e:
        if path.exists():
            log.warning("%s is not a valid model folder and will be rebuilt: %s", path, e)
        return False
    return card.kind == kind


def missing_defaults(models_dir: str | Path, names: list[str] | None = None, force: bool = False) -> list[str]:
    """The default models (of `names`, all by default) whose folder is missing or invalid, in fitting order."""
    todo = []
    for name in names or list(DEFAULT_MODELS):
        try:
            job = DEFAULT_MODELS[name]
        except KeyError:
            raise ValueError(f"unknown default model {name!r}: expected one of {', '.join(DEFAULT_MODELS)}") from None
        if force or not model_is_valid(Path(models_dir) / name, job.kind):
            todo.append(name)
    return sorted(todo, key=list(DEFAULT_MODELS).index)


def build_defaults(models_dir: str | Path, *, runs_dir: str | Path = "runs", force: bool = False,
                   progress: bool = True, names: list[str] | None = None, jobs: int = 1,
                   every: float | None = None, board: Board | None = None) -> dict[str, str]:
    """Fit and export each missing default model; return name -> 'built', 'present' or 'failed'.

    With ``jobs`` > 1 the fits run in that many spawned processes at a time, one torch thread each (two
    OpenMP teams on two cores slow each other down many times over); exports run here as fits finish.
    `board` shows their progress (by default a new one when `progress` and `jobs` > 1; scripts/run passes its own).
    """
    models_dir, runs_dir = Path(models_dir), Path(runs_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    todo = missing_defaults(models_dir, names, force)
    status = {}
    for name in names or list(DEFAULT_MODELS):
        if name not in todo:
            print(f"[build-defaults] {name}: present and valid, skipped", flush=True)
            status[name] = "present"
    if not todo:
        return status
    own_board = board is None and progress and jobs > 1
    if own_board:
        board = Board(todo, every=every)
    say = board.write if board is not None else (lambda line: print(line, flush=True))

    def failed(name: str, e: Exception) -> None:
        status[name] = "failed"
        if board is not None:
            board.phase(name, "failed", done=True)
        say(f"[build-defaults] {name}: {e}")

    def export(name: str, seconds: float) -> None:
        # One export at a time, beside the fits: a fit's slot goes to the next fit at once.
        if board is not None:
            board.phase(name, "exporting")
        try:
            export_checkpoint(runs_dir / name, models_dir / name, name=name)  # staged, renamed into place
        except Exception as e:  # noqa: BLE001 - this model's failure; the others go on
            failed(name, e)
            return
        status[name] = "built"
        text = f"fitted in {seconds:.0f} s, exported to {models_dir / name}"
        if board is not None:
            board.phase(name, text, done=True)
        if board is None or board.live:
            say(f"[build-defaults] {name}: {text}")

    # Progress bars of parallel fits would overwrite each other: a fit shows its own bar only when it is alone.
    quiet = not progress or jobs > 1 or board is not None
    ctx = multiprocessing.get_context("spawn")
    events, threads = ctx.Queue(), ctx.Value("i", 0)  # fit -> board; board -> fits (the last fit's threads)
    reader = threading.Thread(target=_read_events, args=(events, board), name="fit-events", daemon=True)
    reader.start()
    pool: Executor = (ThreadPoolExecutor(max_workers=1, initializer=_fit_process, initargs=(events, None))
                      if jobs <= 1 else
                      ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_fit_process,
                                          initargs=(events, threads)))
    try:
        with ThreadPoolExecutor(max_workers=1) as exports, pool:
            if isinstance(pool, ProcessPoolExecutor):
                _pools.add(pool)
            futures = {}
            for name in todo:
                job = DEFAULT_MODELS[name]
                if board is None:
                    print(f"[build-defaults] {name}: fitting ({job.kind} on {job.data.dataset})", flush=True)
                futures[pool.submit(_timed_fit, name, replace(job, run=replace(job.run, quiet=quiet)),
                                    runs_dir / name)] = name
            for future in as_completed(futures):
                name = futures[future]
                if jobs > 1:
                    _share_cores([f for f in futures if not f.done()], threads)
                try:
                    seconds = future.result()
                except Exception as e:  # noqa: BLE001 - this model's failure; the others go on
                    failed(name, FitError(f"the fit failed: {type(e).__name__}: {e}"))
                else:
                    exports.submit(export, name, seconds)
    finally:
        _pools.discard(pool)  # type: ignore[arg-type]
        events.put(None)
        reader.join()
        if own_board:
            board.close()
    return status


# -- in the fit's process (or thread, with one job) ------------------------------------------------------

_events = None  # the queue to the parent's board (set by _fit_process)
_threads = None  # the threads the parent wants the fit to use (0: leave them)


def _fit_process(events, threads) -> None:
    global _events, _threads
    _events, _threads = events, threads
    if threads is not None:  # a process of the pool: one thread, until it is the last fit left
        torch.set_num_threads(1)


def _timed_fit(name: str, job: FitJob, out: Path) -> float:
    start = time.perf_counter()
    _events.put((name, {"event": "start"}))
    wanted = (lambda: _threads.value or None) if _threads is not None else None
    progress.use(Reporter(sink=lambda event: _events.put((name, event)), threads=wanted))
    try:
        fit(job, out, export=False)
    finally:
        progress.use(Reporter())
    return time.perf_counter() - start


# -- in the parent ----------------------------------------------------------------------------------

def _read_events(events, board: Board | None) -> None:
    while (item := events.get()) is not None:
        name, event = item
        if board is None:
            continue
        if event.get("event") == "start":
            board.start(name)
        else:
            board.event(name, event)


def _share_cores(unfinished: list, threads) -> None:
    """When one fit is left, nothing queued behind it, let it use every core: the others sit idle otherwise.

    The flow-VAE is that last fit (the longest, it bounds how soon all three are served); its remaining epochs
    and its evaluation then run on the cores the finished fits leave."""
    if len(unfinished) == 1 and unfinished[0].running():
        threads.value = os.cpu_count() or 1


def stop_fits() -> None:
    """Terminate the fits now running (scripts/run on SIGTERM: they are not in the caller's way otherwise)."""
    for pool in list(_pools):
        # ProcessPoolExecutor has no public way to kill its workers before Python 3.14 (terminate_workers)
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
