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
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from service.repository import ModelRepositoryError, load_model_card

log = logging.getLogger(__name__)

# name -> `python -m training fit` arguments (besides --out). The VAE settings are the fit defaults:
# the quality models of docs/benchmarks.md.
DEFAULT_MODELS: dict[str, list[str]] = {
    # PPCA selects nothing on validation rows, so it is fitted on all 4,000 training rows.
    "ppca-mnist": ["--model", "ppca", "--method", "em", "--dataset", "mnist5k", "--latent-dim", "40",
                   "--valid-fraction", "0"],
    "vae-mnist": ["--model", "vae", "--dataset", "mnist5k-bin"],
    "flow-vae-mnist": ["--model", "flow-vae", "--dataset", "mnist5k-bin"],
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

    With ``jobs`` > 1 the fits run as that many `python -m training fit` processes at a time (each
    fit uses one torch thread by default, so 2 jobs fill 2 cores); exports run here as fits finish.
    """
    from training.export import export_checkpoint

    models_dir, runs_dir = Path(models_dir), Path(runs_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    status, todo = {}, []
    for name in names or list(DEFAULT_MODELS):
        try:
            fit_args = DEFAULT_MODELS[name]
        except KeyError:
            raise ValueError(f"unknown default model {name!r}: expected one of {', '.join(DEFAULT_MODELS)}") from None
        kind = fit_args[fit_args.index("--model") + 1]
        if not force and model_is_valid(models_dir / name, kind):
            print(f"[build-defaults] {name}: present and valid, skipped")
            status[name] = "present"
        else:
            todo.append(name)
    if not todo:
        return status

    def fit(name: str) -> float:
        start = time.perf_counter()
        argv = ["fit", *DEFAULT_MODELS[name], "--out", str(runs_dir / name), "--no-export"]
        # Progress bars of parallel fits would overwrite each other: only a lone fit shows its bar.
        argv += [] if progress and jobs == 1 else ["--quiet"]
        print(f"[build-defaults] {name}: fitting ({' '.join(DEFAULT_MODELS[name])})", flush=True)
        if jobs == 1:
            from training.cli import main as cli_main

            code = cli_main(argv)
        else:
            # One thread per process: two OpenMP teams on two cores slow each other down many times over.
            env = dict(os.environ, OMP_NUM_THREADS="1")
            code = subprocess.run([sys.executable, "-m", "training", *argv], stdout=subprocess.DEVNULL,
                                  env=env).returncode
        if code != 0:
            raise RuntimeError(f"fitting default model {name!r} failed (exit {code}); see the error above")
        return time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(fit, name): name for name in todo}
        for future in as_completed(futures):
            name = futures[future]
            seconds = future.result()
            target, staging = models_dir / name, models_dir / f".{name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            export_checkpoint(runs_dir / name, staging, name=name)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            print(f"[build-defaults] {name}: fitted in {seconds:.0f} s, exported -> {target}", flush=True)
            status[name] = "built"
    return status
