"""Test log-likelihood of the VAE and the planar-flow VAE on mnist5k-bin, over seeds.

    .venv/bin/python -m bench.vae_quality [--seeds 0 1 2] [--models vae flow-vae] [-- EXTRA FIT ARGS]

Each run is `python -m training fit --model MODEL --dataset mnist5k-bin --seed SEED --no-export` with
the driver's defaults (latent 40, each kind's recipe: `KIND_DEFAULTS` in training/train_vae.py) plus any extra
arguments, so the figures are those of the default models. The test NLL is -(importance-weighted bound), S = 1,000,
in nats per image (every constant kept); the table gives mean and sample standard deviation over
seeds, and the training time of each run (evaluation excluded). Prints and records a section in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import publish, table
from training.cli import main as cli
from training.common import read_json

ROOT = Path(__file__).resolve().parent.parent


def run(model: str, seed: int, out: Path, extra: list[str], threads: int | None = None) -> dict:
    """One fit; in a subprocess with `threads` torch threads when given, else in this process."""
    argv = ["fit", "--model", model, "--dataset", "mnist5k-bin", "--seed", str(seed), "--no-export", "--quiet",
            "--out", str(out), *extra]
    if threads is None:
        with contextlib.redirect_stdout(io.StringIO()):
            if cli(argv) != 0:
                raise SystemExit(f"fit failed: {' '.join(argv)}")
    else:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, "-m", "training", *argv], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"fit failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return read_json(out / "metrics.json")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _spread(xs: list[float]) -> str:
    mean = statistics.fmean(xs)
    return f"{mean:.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{mean:.2f}"


def _gaps(results: dict, seeds: list[int]) -> str:
    """Per seed, how much better the flow-VAE's test NLL is than the VAE's (when both ran)."""
    both = [seed for seed in seeds if ("vae", seed) in results and ("flow-vae", seed) in results]
    if not both:
        return ""
    gaps = [results[("flow-vae", s)]["test_log_likelihood"] - results[("vae", s)]["test_log_likelihood"] for s in both]
    return ("\n\nflow-VAE better than the VAE by (test NLL, per seed): "
            + ", ".join(f"seed {s}: {g:.2f}" for s, g in zip(both, gaps, strict=True)) + " nats.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=["vae", "flow-vae"], choices=["vae", "flow-vae"])
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-vae-quality"))
    p.add_argument("--title", default="VAE quality (mnist5k-bin)")
    p.add_argument("--jobs", type=int, default=1,
                   help="fits at a time; with more than 1, each runs in a subprocess with one torch thread")
    p.add_argument("--no-record", action="store_true", help="print only, do not write docs/benchmarks.md")
    p.add_argument("--reuse", action="store_true", help="report the runs already in --runs-dir instead of refitting")
    args = p.parse_args(argv)

    runs_dir = args.runs_dir.resolve()
    jobs = [(model, seed) for model in args.models for seed in args.seeds]

    def one(job: tuple[str, int]) -> dict:
        out = runs_dir / f"{job[0]}-seed{job[1]}"
        if args.reuse and (out / "metrics.json").is_file():
            return read_json(out / "metrics.json")
        return run(*job, out, extra, 1 if args.jobs > 1 else None)

    # more than one job: one torch thread per fit, `jobs` fits at a time
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = dict(zip(jobs, pool.map(one, jobs), strict=True))
    rows, summary = [], []
    for model in args.models:
        nll, elbo, secs = [], [], []
        for seed in args.seeds:
            m = results[(model, seed)]
            nll.append(-m["test_log_likelihood"])
            elbo.append(m["test_elbo"])
            secs.append(m["seconds"])
            valid = m.get("valid_log_likelihood")
            rows.append([model, seed, f"{-m['test_log_likelihood']:.2f}",
                         f"{-valid:.2f}" if valid is not None else "-", f"{m['test_elbo']:.2f}",
                         f"{m['train_elbo']:.2f}", f"{m['valid_elbo']:.2f}", m["best_epoch"], m["epochs"],
                         f"{m['seconds']:.0f}", f"{m['seconds_per_epoch']:.2f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        summary.append([model, _spread(nll), f"{max(nll) - min(nll):.2f}", _spread(elbo),
                        f"{statistics.fmean(secs):.0f}"])
    how = (f"{args.jobs} fits at a time, one torch thread each" if args.jobs > 1
           else f"one fit at a time, {torch_threads()} torch threads")
    body = (f"Runs: {how}. Test NLL = -(importance-weighted bound, S = 1,000) in nats per image on the "
            "1,000 mnist5k-bin test rows; ELBOs with S = 10. Fit settings: the driver's defaults"
            + (f" plus `{' '.join(extra)}`" if extra else "") + ".\n\n"
            + table(["model", "test NLL (mean ± sd)", "range", "test ELBO", "train s (mean)"], summary)
            + "\n\nPer run:\n\n"
            + table(["model", "seed", "test NLL", "valid NLL", "test ELBO", "train ELBO", "valid ELBO", "best epoch",
                     "epochs", "train s", "s/epoch"], rows)
            + _gaps(results, args.seeds))
    publish(args.title, body, module="bench.vae_quality", save=not args.no_record)


if __name__ == "__main__":
    main()
