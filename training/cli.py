"""`python -m training`: fit, evaluate and export latent-variable image models.

    python -m training fit --model ppca --method em --dataset digits --latent-dim 10 --out runs/ppca
    python -m training evaluate runs/ppca
    python -m training export runs/ppca --out models/ppca-digits
    python -m training build-defaults --models-dir models
    torchrun --nproc-per-node 2 -m training fit --model vae --dataset digits --out runs/vae   # 2 processes

Each model kind has a driver (training/drivers.py) whose settings dataclass gives `fit` its own options;
the commands here only parse, dispatch and print. The imports inside `main` keep `--help` and the
light commands from loading torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training.common import load_checkpoint
from training.config import DataOptions, FitJob, RunOptions, add_options, from_args
from training.drivers import DRIVERS, driver_for


def _base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a model on a dataset and write it into --out")
    fit.add_argument("--model", required=True, choices=sorted(DRIVERS), help="model kind")
    fit.add_argument("--out", required=True, type=Path, help="output folder")
    add_options(fit, DataOptions)
    add_options(fit, RunOptions)
    fit.add_argument("--no-export", action="store_true", help="do not export ONNX graphs into --out")

    ev = sub.add_parser("evaluate", help="print the test figures of a fitted model as JSON")
    ev.add_argument("run_dir", type=Path, help="folder written by 'fit'")
    ev.add_argument("--samples", type=int, default=1000, help="importance samples for the log-likelihood bound")
    ev.add_argument("--seed", type=int, default=RunOptions.seed)
    ev.add_argument("--device", default=RunOptions.device)

    ex = sub.add_parser("export", help="export a fitted model to ONNX with a model card")
    ex.add_argument("checkpoint", type=Path, help="a checkpoint.pt or the folder holding it")
    ex.add_argument("--out", required=True, type=Path, help="model folder to write, e.g. models/NAME")
    ex.add_argument("--name", default=None, help="model name in the card (default: the folder's name)")

    bd = sub.add_parser("build-defaults", help="fit and export the default model set if it is missing")
    bd.add_argument("--models-dir", type=Path, default=Path("models"))
    bd.add_argument("--runs-dir", type=Path, default=Path("runs"))
    bd.add_argument("--force", action="store_true", help="rebuild models that are already there and valid")
    bd.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="fits at a time, each in its own process (default: up to 2, the cores of a small host)")
    bd.add_argument("--quiet", action="store_true", help="no progress display")
    bd.add_argument("--progress-every", type=float, default=None, metavar="SECONDS",
                    help="without a terminal: a progress line per model this often (default 15)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line `argv` (without the program name) parsed; `fit` with the chosen model's own options."""
    parser = _base_parser()
    kind = _fit_model(argv)
    if kind is not None:  # the chosen model's driver adds its own options to `fit` (and to its --help)
        fit_parser = parser._subparsers._group_actions[0].choices["fit"]
        add_options(fit_parser.add_argument_group(kind), driver_for(kind).Options)
    return parser.parse_args(argv)


def fit_job(args: argparse.Namespace) -> FitJob:
    """The typed settings of a parsed `fit` command line, built once here."""
    return FitJob(args.model, from_args(driver_for(args.model).Options, args), from_args(DataOptions, args),
                  from_args(RunOptions, args))


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "fit":
            from training.distributed import PeerError
            from training.fitting import fit

            try:
                metrics = fit(fit_job(args), args.out, export=not args.no_export)
            except PeerError as e:  # another rank of a torchrun job died or hung
                print(f"error: {e}", file=sys.stderr)
                return 3
            if metrics is not None:  # rank 0 of a torchrun job (or the one process) reports
                print(json.dumps(metrics, indent=2))
            return 0
        if args.command == "evaluate":
            ckpt = load_checkpoint(args.run_dir)
            figures = driver_for(ckpt["kind"]).evaluate(ckpt, samples=args.samples, seed=args.seed,
                                                        device=args.device)
            print(json.dumps(figures, indent=2))
            return 0
        if args.command == "export":
            from training.export import export_checkpoint

            print(json.dumps(export_checkpoint(args.checkpoint, args.out, name=args.name), indent=2))
            return 0
        if args.command == "build-defaults":
            from training.defaults import build_defaults

            status = build_defaults(args.models_dir, runs_dir=args.runs_dir, force=args.force,
                                    progress=not args.quiet, jobs=args.jobs,
                                    every=args.progress_every)
            failed = [name for name, s in status.items() if s == "failed"]
            if failed:
                print(f"error: {len(failed)} default model(s) failed: {', '.join(failed)} (see above)", file=sys.stderr)
            return 1 if failed else 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command!r}")


def _fit_model(argv: list[str]) -> str | None:
    """The --model of a `fit` command line when it names a known kind, read before the full parse."""
    if not argv or argv[0] != "fit":
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    known, _ = pre.parse_known_args(argv[1:])
    return known.model if known.model in DRIVERS else None
