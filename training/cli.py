"""`python -m training`: fit, evaluate and export latent-variable image models.

    python -m training fit --model ppca --method em --dataset digits --latent-dim 10 --out runs/ppca
    python -m training evaluate runs/ppca
    python -m training export runs/ppca --out models/ppca-digits
    python -m training build-defaults --models-dir models

Each model kind has a driver module (`DRIVERS`) that adds its own options to `fit`, fits, evaluates
and exports; the commands here only parse, dispatch and print.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType

from training.data import TEST_FRACTION

# kind -> driver module. A driver provides add_arguments(parser), fit(args, data, out) -> metrics,
# evaluate(ckpt, args) -> figures and export(ckpt, out, ...) -> card.
DRIVERS = {
    "ppca": "training.train_ppca",
    "vae": "training.train_vae",
    "flow-vae": "training.train_vae",
}


def driver_for(kind: str) -> ModuleType:
    try:
        module = DRIVERS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(DRIVERS)}") from None
    return importlib.import_module(module)


def _base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a model on a dataset and write it into --out")
    fit.add_argument("--model", required=True, choices=sorted(DRIVERS), help="model kind")
    fit.add_argument("--dataset", default="mnist5k",
                     help="digits, mnist5k, mnist5k-bin, or a path to IDX / .npz / .npy files or an image folder")
    fit.add_argument("--out", required=True, type=Path, help="output folder")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    fit.add_argument("--valid-fraction", type=float, default=0.1,
                     help="share of the training rows held out for validation (never the test rows)")
    fit.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                     help="share of the rows of user data (and digits) held out as test rows (the MNIST sets keep "
                          "their fixed 1,000 test rows)")
    fit.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                     help="resize images of a user folder to H x W (default: the first image's size)")
    fit.add_argument("--channels", type=int, choices=(1, 3), default=None,
                     help="1: grayscale, 3: RGB; user images are converted to it (colour to gray by ITU-R 601-2 luma, "
                          "gray repeated into RGB, transparent pixels on white). Default: the data's own (3 when the "
                          "images are colour; a folder mixing both needs it)")
    fit.add_argument("--no-export", action="store_true", help="do not export ONNX graphs into --out")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    # build-defaults' parallel fits report their progress on a pipe (training/progress.py)
    fit.add_argument("--progress-fd", type=int, default=None, help=argparse.SUPPRESS)

    ev = sub.add_parser("evaluate", help="print the test figures of a fitted model as JSON")
    ev.add_argument("run_dir", type=Path, help="folder written by 'fit'")
    ev.add_argument("--samples", type=int, default=1000, help="importance samples for the log-likelihood bound")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto")

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _base_parser()
    model = _fit_model(argv)
    if model is not None:  # the chosen model's driver adds its own options to `fit` (and to its --help)
        driver_for(model).add_arguments(parser._subparsers._group_actions[0].choices["fit"])
    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            return _fit(driver_for(args.model), args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "export":
            return _export(args)
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


def _fit(driver: ModuleType, args: argparse.Namespace) -> int:
    from training.data import load_dataset

    image_size = tuple(args.image_size) if args.image_size else None
    data = load_dataset(args.dataset, valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                        image_size=image_size, channels=args.channels)
    metrics = driver.fit(args, data, args.out)
    if not args.no_export:
        from training.export import export_checkpoint
        from training.progress import reporter

        reporter(args).phase("exporting")
        export_checkpoint(args.out, args.out)
    print(json.dumps(metrics, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.common import load_checkpoint

    ckpt = load_checkpoint(args.run_dir)
    figures = driver_for(ckpt["kind"]).evaluate(ckpt, args)
    print(json.dumps(figures, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_checkpoint

    card = export_checkpoint(args.checkpoint, args.out, name=args.name)
    print(json.dumps(card, indent=2))
    return 0
