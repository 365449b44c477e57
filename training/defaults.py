"""The default model set served by `scripts/run` and docker compose, built on the embedded data.

    python -m training build-defaults --models-dir models

Each model is fitted on the 4,000 training rows of the `mnist5k-bin` split (ppca on the same rows,
continuous), so its card's test figures are honest figures on the 1,000 test rows. A model whose
folder is already there and valid is skipped; a broken one is rebuilt. Every model is exported into
a hidden folder beside its target and renamed into place once its card validates
(training/staging.py), so a service polling the repository never sees a half-written model: it
serves each model as soon as its export lands.

With `jobs` > 1 the fits run as that many processes at a time, each reporting its progress on a pipe
(training/progress.py): one bar per model in a terminal, a plain line per model every `every` seconds
otherwise. A fit that fails shows its own last lines and exit status; the others go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from service.repository import ModelRepositoryError, load_model_card
from training.progress import Board

log = logging.getLogger(__name__)

# name -> `python -m training fit` arguments (besides --out). The VAE settings are the fit defaults:
# the quality models of docs/benchmarks.md. Fitted in this order, `jobs` at a time: ppca first, the
# quickest, to be served within a minute or two; then the longest, flow-vae, so that it starts at once
# beside ppca, and vae takes ppca's place when it is done (all three are done sooner than in any other order).
DEFAULT_MODELS: dict[str, list[str]] = {
    # PPCA selects nothing on validation rows, so it is fitted on all 4,000 training rows.
    "ppca-mnist": ["--model", "ppca", "--method", "em", "--dataset", "mnist5k", "--latent-dim", "40",
                   "--valid-fraction", "0"],
    "flow-vae-mnist": ["--model", "flow-vae", "--dataset", "mnist5k-bin"],
    "vae-mnist": ["--model", "vae", "--dataset", "mnist5k-bin"],
}
LOG_TAIL_LINES = 20  # of a failed fit's output, shown
_running: set[subprocess.Popen] = set()  # the fit processes now running (stop_fits)


class FitError(RuntimeError):
    """A default model's fit failed: how (its exit status), and what it said."""

    def __init__(self, name: str, how: str, said: str):
        super().__init__(f"the fit failed: {how}" + (f"\n{said}" if said else ""))


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
            fit_args = DEFAULT_MODELS[name]
        except KeyError:
            raise ValueError(f"unknown default model {name!r}: expected one of {', '.join(DEFAULT_MODELS)}") from None
        kind = fit_args[fit_args.index("--model") + 1]
        if force or not model_is_valid(Path(models_dir) / name, kind):
            todo.append(name)
    return sorted(todo, key=list(DEFAULT_MODELS).index)


def build_defaults(models_dir: str | Path, *, runs_dir: str | Path = "runs", force: bool = False,
                   progress: bool = True, names: list[str] | None = None, jobs: int = 1,
                   every: float | None = None, board: Board | None = None) -> dict[str, str]:
    """Fit and export each missing default model; return name -> 'built', 'present' or 'failed'.

    With ``jobs`` > 1 the fits run as that many `python -m training fit` processes at a time (each
    fit uses one torch thread by default, so 2 jobs fill 2 cores); exports run here as fits finish.
    `board` shows their progress (by default a new one when `progress`; scripts/run passes its own).
    """
    from training.export import export_checkpoint

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
            export_checkpoint(runs_dir / name, models_dir / name, name=name)
        except Exception as e:  # noqa: BLE001 - this model's failure; the others go on
            failed(name, e)
            return
        status[name] = "built"
        text = f"fitted in {seconds:.0f} s, exported to {models_dir / name}"
        if board is not None:
            board.phase(name, text, done=True)
        if board is None or board.live:
            say(f"[build-defaults] {name}: {text}")

    try:
        with ThreadPoolExecutor(max_workers=1) as exports, ThreadPoolExecutor(max_workers=max(1, jobs)) as fits:
            futures = {fits.submit(_fit, name, runs_dir, progress, jobs, board): name for name in todo}
            for future in as_completed(futures):
                name = futures[future]
                if jobs > 1:
                    _share_cores([f for f in futures if not f.done()])
                try:
                    seconds = future.result()
                except Exception as e:  # noqa: BLE001 - this model's failure; the others go on
                    failed(name, e)
                else:
                    exports.submit(export, name, seconds)
    finally:
        if own_board:
            board.close()
    return status


def _fit(name: str, runs_dir: Path, progress: bool, jobs: int, board: Board | None) -> float:
    """Fit default model `name` into runs_dir/name without exporting; seconds taken. FitError when it fails."""
    start = time.perf_counter()
    out = runs_dir / name
    argv = ["fit", *DEFAULT_MODELS[name], "--out", str(out), "--no-export"]
    if board is not None:
        board.start(name)
    else:
        print(f"[build-defaults] {name}: fitting ({' '.join(DEFAULT_MODELS[name])})", flush=True)
    if jobs == 1:  # here, with the fit's own progress bar (the only one on the screen)
        from training.cli import main as cli_main

        try:
            code = cli_main(argv + ([] if progress else ["--quiet"]))
        except Exception as e:  # noqa: BLE001 - reported as this model's failure
            raise FitError(name, type(e).__name__, str(e)) from e
        if code != 0:
            raise FitError(name, f"exit status {code} (its error is above)", "")
        return time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "fit.log"
    # One thread per process: two OpenMP teams on two cores slow each other down many times over.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "wb") as log_file:
            cmd = [sys.executable, "-m", "training", *argv, "--quiet", "--progress-fd", str(write_fd)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    pass_fds=(write_fd,), text=True)
    finally:
        os.close(write_fd)
    _running.add(proc)
    with os.fdopen(read_fd, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:  # until the fit exits
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if board is not None and isinstance(event, dict):
                board.event(name, event)
    code = proc.wait()
    _running.discard(proc)
    with contextlib.suppress(OSError):
        proc.stdin.close()  # type: ignore[union-attr]
    if code != 0:
        lines = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise FitError(name, f"{status}; its last lines (all of them in {log_path}):",
                       "\n".join("    " + ln for ln in lines))
    return time.perf_counter() - start


def _share_cores(unfinished: list) -> None:
    """When one fit is left, nothing queued behind it, let it use every core: the others sit idle otherwise.

    The flow-VAE is that last fit (the longest, it bounds how soon all three are served); its remaining epochs
    and its evaluation then run on the cores the finished fits leave."""
    if len(unfinished) != 1 or not unfinished[0].running():
        return
    threads = os.cpu_count() or 1
    for proc in list(_running):
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(f"threads {threads}\n")
            proc.stdin.flush()


def stop_fits() -> None:
    """Terminate the fits now running (scripts/run on SIGTERM: they are not in the caller's way otherwise)."""
    for proc in list(_running):
        if proc.poll() is None:
            proc.terminate()
