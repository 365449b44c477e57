"""What each fit option of issue 20 gives on mnist5k-bin: one seed, a shortened schedule, chosen on validation
figures only.

    .venv/bin/python -m bench.vae_options [--jobs 2] [--reuse]

Each row is `python -m training fit --model MODEL --dataset mnist5k-bin --seed 0 --threads 1` with its options
(bench/vae_quality.py's runner, one torch thread per fit, `--jobs` fits at a time). Screening runs use 300 epochs
against a 300-epoch run of the kind's plain recipe (s: flow-VAE, v: VAE); the full-length rows (1,000 epochs)
compare with the 600-epoch quality models. The figure that decides is the validation importance-weighted bound
(S = 1,000, `valid_log_likelihood`); the test NLL is shown, not used. `--reuse` reports runs already in
`--runs-dir` (their metrics.json) instead of fitting them again. Prints and records a section in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import publish, table
from bench.vae_quality import run
from training.common import read_json

SHORT = ["--epochs", "300", "--patience", "0"]
PLAIN = ["--layer", "plain"]  # the recipe the options were tried against (the flow-VAE's default is gated now)
# name -> (model, options, what it tries); the first of each group is the group's reference
RUNS: dict[str, tuple[str, list[str], str]] = {
    "s0-base300": ("flow-vae", [*SHORT, *PLAIN], "the plain recipe at 300 epochs (reference of the s rows)"),
    "s1-iwae5": ("flow-vae", [*SHORT, *PLAIN, "--objective", "iwae", "--k", "5"],
                 "importance-weighted objective, k = 5"),
    "s8-iwae2": ("flow-vae", [*SHORT, *PLAIN, "--objective", "iwae", "--k", "2"],
                 "importance-weighted objective, k = 2"),
    "s2-gated": ("flow-vae", [*SHORT, "--layer", "gated"], "gated hidden layers"),
    "s3-resid": ("flow-vae", [*SHORT, "--layer", "residual"], "residual hidden layers"),
    "s4-lrwu": ("flow-vae", [*SHORT, *PLAIN, "--lr-warmup-epochs", "10"], "learning-rate warm-up, 10 epochs"),
    "s5-lat64": ("flow-vae", [*SHORT, *PLAIN, "--latent-dim", "64"], "flows on a larger latent (d = 64)"),
    "s6-klcos": ("flow-vae", [*SHORT, *PLAIN, "--kl-schedule", "cosine"], "cosine KL warm-up"),
    "s7-k20wu": ("flow-vae", [*SHORT, *PLAIN, "--flows", "20", "--lr-warmup-epochs", "10"],
                 "20 flows (with a 10-epoch learning-rate warm-up)"),
    "s9-gated-lrwu": ("flow-vae", [*SHORT, "--layer", "gated", "--lr-warmup-epochs", "10"],
                      "gated layers and a 10-epoch learning-rate warm-up together"),
    "v1-vae300": ("vae", SHORT, "the VAE's recipe at 300 epochs (reference of the v rows)"),
    "v2-vaegated300": ("vae", [*SHORT, "--layer", "gated"], "the VAE with gated hidden layers"),
    "fv-e1000p0": ("flow-vae", ["--epochs", "1000", "--patience", "0", *PLAIN], "1,000 plain epochs instead of 600"),
    "vae-e1000p0": ("vae", ["--epochs", "1000", "--patience", "0"], "the VAE, 1,000 epochs instead of 600"),
}


def valid_bound(run_dir: Path, samples: int = 1000) -> float:
    """The validation importance-weighted bound of a fitted run, from its checkpoint, as `fit` computes it."""
    import torch

    from training.shards import reopen_dataset
    from training.train_vae import _figures, build_model

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    figures = _figures(build_model(ckpt), reopen_dataset(ckpt["meta"]), S=samples, chunk=50_000,
                       seed=ckpt["meta"]["training"]["seed"], device="cpu", splits=("valid",))
    return figures["valid_log_likelihood"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--runs-dir", type=Path, default=Path("runs/bench-vae-options"))
    p.add_argument("--jobs", type=int, default=2, help="fits at a time, one torch thread each")
    p.add_argument("--reuse", action="store_true", help="report the runs already in --runs-dir instead of refitting")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    runs_dir = args.runs_dir.resolve()

    def fit(name: str) -> dict:
        model, options, _ = RUNS[name]
        if args.reuse and (runs_dir / name / "metrics.json").is_file():
            m = read_json(runs_dir / name / "metrics.json")
        else:
            m = run(model, 0, runs_dir / name, [*options, "--threads", "1"], threads=1)
        if m.get("valid_log_likelihood") is None:  # a run by code from before the figure was written
            m["valid_log_likelihood"] = valid_bound(runs_dir / name)
            m["valid_from_checkpoint"] = True
        return m

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(args.runs, pool.map(fit, args.runs), strict=True))
    refs = {"s": results.get("s0-base300", {}).get("valid_log_likelihood"),
            "v": results.get("v1-vae300", {}).get("valid_log_likelihood")}
    rows = []
    for name, m in results.items():
        model, options, what = RUNS[name]
        valid = m.get("valid_log_likelihood")
        ref = refs.get(name[0]) if name[1].isdigit() else None  # screening rows only
        delta = f"{valid - ref:+.2f}" if valid is not None and ref is not None else "-"
        shown = f"{valid:.2f}" + ("*" if m.get("valid_from_checkpoint") else "")
        rows.append([name, model, what, f"`{' '.join(options)}`", shown, delta,
                     f"{-m['test_log_likelihood']:.2f}", m["best_epoch"], m["epochs"], f"{m['seconds']:.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    body = ("One seed (0), one torch thread per fit, " + f"{args.jobs} at a time. valid IW bound: the importance-"
            "weighted bound with S = 1,000 on the 400 validation rows (nats per image, higher is better); "
            "delta: against `s0-base300` (s rows) or `v1-vae300` (v rows); *: computed afterwards from the run's "
            "checkpoint by the fit's own "
            "function (a run by code that did not write it yet). Test NLL: -(the same bound on the 1,000 test rows), "
            "not used to choose. train s: wall seconds, with up to four other fits sharing the two cores at nice "
            "19: not a cost figure (a gated epoch costs about 1.5 plain ones; k = 5 about 3).\n\n"
            + table(["run", "model", "what", "options", "valid IW bound", "delta", "test NLL", "best epoch", "epochs",
                     "train s"], rows))
    publish("VAE fit options (issue 20), one seed", body, module="bench.vae_options", save=not args.no_record)


if __name__ == "__main__":
    main()
