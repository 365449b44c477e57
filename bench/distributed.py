"""Training with 1 and 2 processes on this machine's CPUs: real `python -m training fit` runs, one process or
`torchrun --standalone --nproc-per-node 2` (gloo), side by side in each round.

    .venv/bin/python -m bench.distributed [--epochs 4] [--rounds 2] [--no-record]

- s/epoch of vae and flow-vae (the fit's defaults: 512-512 units, batch 100, mnist5k-bin), from each fit's
  metrics.json (validation included, as a fit runs it), as 1 process x 1 thread, 1 process x 2 threads and
  2 processes x 1 thread;
- s/iteration of PPCA EM (mnist5k, d = 40, exact log-likelihood after each iteration), alike;
- the all-reduce cost per step: a gloo all-reduce of the VAEs' gradients and of EM's statistics, and a DDP
  training step with and without its gradient all-reduce (`no_sync`), timed by a worker under torchrun;
- weak scaling: 1,800 training rows per rank (.npy files of mnist5k-bin rows: one process loads its file, two
  ranks map theirs), s/epoch and s/iteration at 1 and 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIGS = (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1))


def fit(fit_args: list[str], out: Path, *, procs: int = 1, threads: int = 1) -> dict:
    """One `fit` as one process or as `procs` torchrun ranks; returns its metrics.json."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    launcher = ([sys.executable] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)])
    cmd = [*launcher, "-m", "training", "fit", *fit_args, "--out", str(out), "--no-export", "--quiet"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=REPO)
    return json.loads((out / "metrics.json").read_text())


def vae_args(model: str, dataset: str, epochs: int, threads: int) -> list[str]:
    return ["--model", model, "--dataset", dataset, "--epochs", str(epochs), "--patience", "0",
            "--eval-samples", "1", "--threads", str(threads)]


def em_args(dataset: str, iterations: int, valid_fraction: str = "0") -> list[str]:
    return ["--model", "ppca", "--method", "em", "--dataset", dataset, "--latent-dim", "40",
            "--iterations", str(iterations), "--tol", "-1", "--valid-fraction", valid_fraction]


def per_unit(metrics: dict) -> float:
    """s/epoch of a VAE fit, s/iteration of an EM fit."""
    if "seconds_per_epoch" in metrics:
        return metrics["seconds_per_epoch"]
    return metrics["seconds"] / metrics["iterations"]


def worker(reps: int) -> None:
    """Under torchrun: time gloo all-reduces and DDP steps; rank 0 prints the figures as JSON."""
    import torch
    import torch.distributed as tdist

    from training.distributed import setup
    from training.vae import VAE, VAEConfig
    from training.vae_epoch import LogWeightTerms

    dist = setup("cpu")
    torch.manual_seed(0)

    def median_ms(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            dist.collective("a barrier", tdist.barrier)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    figures = {}
    for name, flows in (("vae", 0), ("flow-vae", 10)):
        model = VAE(VAEConfig(data_dim=784, flows=flows)).train()
        n_params = sum(p.numel() for p in model.parameters())
        buf = torch.zeros(n_params)
        figures[f"{name} gradients ({n_params:,} float32)"] = median_ms(lambda b=buf: tdist.all_reduce(b))
        ddp = dist.wrap(LogWeightTerms(model))
        x = (torch.rand(50, 784) < 0.3).float()
        eps = torch.randn(50, 1, 40)

        def step(ddp=ddp, x=x, eps=eps):
            loss = -sum(t.sum() for t in ddp(x, eps))
            loss.backward()

        def step_no_sync(ddp=ddp, step=step):
            with ddp.no_sync():
                step()

        figures[f"{name}: DDP step, 50 rows per rank"] = median_ms(step)
        figures[f"{name}: the same step without its all-reduce (no_sync)"] = median_ms(step_no_sync)
    stats = torch.zeros(784 * 40 + 40 * 40 + 2, dtype=torch.float64)
    figures[f"EM statistics ({stats.numel():,} float64)"] = median_ms(lambda: tdist.all_reduce(stats))
    if dist.is_main:
        print(json.dumps(figures))
    dist.close()


def collectives(reps: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "bench.distributed", "--worker", "--reps", str(reps)]
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def weak_files(folder: Path) -> dict[int, Path]:
    """.npy files of mnist5k-bin rows whose splits leave 1,800 training rows per rank at 1 and 2 ranks."""
    from training.data import mnist5k_raw

    x = (np.random.default_rng(1).random((5000, 784)) < mnist5k_raw()).astype(np.uint8) * 255
    files = {}
    for ranks, n in ((1, 2500), (2, 5000)):  # test 20 %, validation 10 % of the rest: 0.72 n training rows
        files[ranks] = folder / f"mnist-bin-{n}.npy"
        np.save(files[ranks], x[:n].reshape(n, 28, 28))
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="VAE epochs per fit (EM runs 10x as many iterations)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every configuration, side by side")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per collective")
    p.add_argument("--no-record", action="store_true", help="print only, do not write docs/benchmarks.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.reps)
    from bench.report import publish, table

    load_before = os.getloadavg()[0]
    strong: dict[tuple[str, str], list[float]] = {}
    weak: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = weak_files(tmp)
        for r in range(args.rounds):
            for label, procs, threads in CONFIGS:
                for model in ("vae", "flow-vae"):
                    m = fit(vae_args(model, "mnist5k-bin", args.epochs, threads), tmp / "run", procs=procs,
                            threads=threads)
                    strong.setdefault((model, label), []).append(per_unit(m))
                m = fit(em_args("mnist5k", 10 * args.epochs), tmp / "run", procs=procs, threads=threads)
                strong.setdefault(("ppca em", label), []).append(per_unit(m))
            for ranks, path in files.items():
                m = fit(vae_args("vae", str(path), args.epochs, 1), tmp / "run", procs=ranks)
                weak.setdefault(("vae", ranks), []).append(per_unit(m))
                m = fit(em_args(str(path), 10 * args.epochs, "0.1"), tmp / "run", procs=ranks)
                weak.setdefault(("ppca em", ranks), []).append(per_unit(m))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        comm = collectives(args.reps)

    rows = []
    for model, unit in (("vae", "s/epoch"), ("flow-vae", "s/epoch"), ("ppca em", "s/iteration")):
        base = statistics.median(strong[(model, CONFIGS[0][0])])
        for label, _, _ in CONFIGS:
            t = statistics.median(strong[(model, label)])
            rows.append([model, label, unit, f"{t:.4f}", f"{base / t:.2f}x"])
    weak_rows = []
    for model, unit in (("vae", "s/epoch"), ("ppca em", "s/iteration")):
        t1 = statistics.median(weak[(model, 1)])
        for ranks in (1, 2):
            t = statistics.median(weak[(model, ranks)])
            weak_rows.append([model, ranks, 1800 * ranks, unit, f"{t:.4f}", f"{t1 / t:.2f}"])
    body = (
        f"Median over {args.rounds} rounds; each round runs every configuration once, side by side. VAE fits: "
        f"{args.epochs} epochs (the first included), the fit's default architecture and batch 100 (the global "
        f"batch: 50 rows per rank at 2 processes); EM: {10 * args.epochs} iterations. The machine is shared with "
        f"other work: 1-minute load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after.\n\n"
        "Strong scaling (the same data, 3,600 mnist5k-bin / 4,000 mnist5k training rows):\n\n"
        + table(["model", "processes x threads", "unit", "median", "speed-up"], rows)
        + "\n\nAll-reduce cost per step (2 ranks, gloo, median of "
        f"{args.reps}; a DDP step is forward and backward on 50 rows per rank, its all-reduce overlapping backward):"
        "\n\n" + table(["operation", "ms"], [[k, f"{v:.2f}"] for k, v in comm.items()])
        + "\n\nWeak scaling (1,800 training rows per rank; 1 rank loads its .npy file, 2 ranks map theirs):\n\n"
        + table(["model", "ranks", "training rows", "unit", "median", "efficiency t1 / tW"], weak_rows))
    publish("Distributed training (CPU)", body, module="bench.distributed", save=not args.no_record)


if __name__ == "__main__":
    main()
