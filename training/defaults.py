"""The default model set served by `scripts/run` and docker compose, built on the embedded data.

    python -m training build-defaults --models-dir models

Each model is fitted on the 4,000 training rows of the `mnist5k-bin` split (ppca on the same rows,
continuous), so its card's test figures are honest figures on the 1,000 test rows. A model whose
folder is already there and valid is skipped; a broken one is rebuilt. Every model is exported into
a hidden temporary folder and moved into place only once its card validates, so the service never
sees a half-written model.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch

from model_repository.card import ModelRepositoryError, load_model_card
from training.config import DataOptions, FitJob
from training.export import export_checkpoint
from training.fitting import fit
from training.train_ppca import PPCAFit
from training.train_vae import VAEFit

log = logging.getLogger(__name__)

# name -> its fit. The VAE settings are the fit defaults: the quality models of docs/benchmarks.md.
DEFAULT_MODELS: dict[str, FitJob] = {
    # PPCA selects nothing on validation rows, so it is fitted on all 4,000 training rows.
    "ppca-mnist": FitJob("ppca", PPCAFit(method="em", latent_dim=40), DataOptions("mnist5k", valid_fraction=0.0)),
    "vae-mnist": FitJob("vae", VAEFit(), DataOptions("mnist5k-bin")),
    "flow-vae-mnist": FitJob("flow-vae", VAEFit(), DataOptions("mnist5k-bin")),
}


def model_is_valid(path: Path, kind: str) -> bool:
    try:
        card = load_model_card(path)
    except ModelRepositoryError as e:
        if path.exists():
            log.warning("%s is not a valid model folder and will be rebuilt: %s", path, e)
        return False
    return card.kind == kind


def build_defaults(models_dir: str | Path, *, runs_dir: str | Path = "runs", force: bool = False,
                   progress: bool = True, names: list[str] | None = None, jobs: int = 1) -> dict[str, str]:
    """Fit and export each missing default model; return name -> 'built' or 'present'.

    With ``jobs`` > 1 the fits run in that many processes at a time, one torch thread each (two OpenMP
    teams on two cores slow each other down many times over); exports run here as fits finish.
    """
    models_dir, runs_dir = Path(models_dir), Path(runs_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    status, todo = {}, []
    for name in names or list(DEFAULT_MODELS):
        try:
            job = DEFAULT_MODELS[name]
        except KeyError:
            raise ValueError(f"unknown default model {name!r}: expected one of {', '.join(DEFAULT_MODELS)}") from None
        if not force and model_is_valid(models_dir / name, job.kind):
            print(f"[build-defaults] {name}: present and valid, skipped")
            status[name] = "present"
        else:
            todo.append(name)
    if not todo:
        return status

    # Progress bars of parallel fits would overwrite each other: only a lone fit shows its bar.
    quiet = not progress or jobs > 1
    pool: Executor = (ThreadPoolExecutor(max_workers=1) if jobs <= 1 else ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread))
    with pool:
        futures = {}
        for name in todo:
            job = DEFAULT_MODELS[name]
            job = replace(job, run=replace(job.run, quiet=quiet))
            print(f"[build-defaults] {name}: fitting ({job.kind} on {job.data.dataset})", flush=True)
            futures[pool.submit(_timed_fit, job, runs_dir / name)] = name
        for future in as_completed(futures):
            name = futures[future]
            try:
                seconds = future.result()
            except Exception as e:
                raise RuntimeError(f"fitting default model {name!r} failed: {type(e).__name__}: {e}") from e
            target, staging = models_dir / name, models_dir / f".{name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            export_checkpoint(runs_dir / name, staging, name=name)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            print(f"[build-defaults] {name}: fitted in {seconds:.0f} s, exported -> {target}", flush=True)
            status[name] = "built"
    return status


def _timed_fit(job: FitJob, out: Path) -> float:
    start = time.perf_counter()
    fit(job, out, export=False)
    return time.perf_counter() - start


def _one_thread() -> None:
    torch.set_num_threads(1)
