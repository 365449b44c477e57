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
import shutil
import time
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
                   progress: bool = True, names: list[str] | None = None) -> dict[str, str]:
    """Fit and export each missing default model; return name -> 'built' or 'present'."""
    from training.cli import main as cli_main
    from training.export import export_checkpoint

    models_dir, runs_dir = Path(models_dir), Path(runs_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    status = {}
    for name in names or list(DEFAULT_MODELS):
        try:
            fit_args = DEFAULT_MODELS[name]
        except KeyError:
            raise ValueError(f"unknown default model {name!r}: expected one of {', '.join(DEFAULT_MODELS)}") from None
        kind = fit_args[fit_args.index("--model") + 1]
        target = models_dir / name
        if not force and model_is_valid(target, kind):
            print(f"[build-defaults] {name}: present and valid, skipped")
            status[name] = "present"
            continue
        print(f"[build-defaults] {name}: fitting ({' '.join(fit_args)})", flush=True)
        start = time.perf_counter()
        run = runs_dir / name
        argv = ["fit", *fit_args, "--out", str(run), "--no-export"] + ([] if progress else ["--quiet"])
        if cli_main(argv) != 0:
            raise RuntimeError(f"fitting default model {name!r} failed; see the error above")
        staging = models_dir / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        export_checkpoint(run, staging, name=name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        print(f"[build-defaults] {name}: built in {time.perf_counter() - start:.0f} s -> {target}", flush=True)
        status[name] = "built"
    return status
