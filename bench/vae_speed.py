"""Seconds per training epoch of the VAE and the planar-flow VAE with the peers' architecture.

    .venv/bin/python -m bench.vae_speed [--epochs 10] [--threads 1 2]

Architecture as the peers': encoder 784-512-80, decoder 40-512-784, 10 planar flows, Adam, batch 100,
4,000 binarized mnist5k training images (a fresh binarization each epoch, as `fit` does). The peers'
planar flows (pyro, normflows, pythae) have global parameters, so "flow-vae (global)" is exactly their
model; "flow-vae (amortized)" is this project's default, whose encoder has K (2d + 1) = 810 more outputs
(the flow parameters of each image) on the same 512 units. An epoch is
what `training.vae_epoch.train_epoch` does in one process, the binarization included; the figure is the median over
`--epochs` epochs after one warm-up epoch. Prints and records a section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.report import publish, table
from training.data import mnist5k_raw, mnist5k_split
from training.distributed import Dist
from training.train_vae import make_optimizer
from training.vae import VAE, VAEConfig
from training.vae_epoch import GlobalBatches, LogWeightTerms, train_epoch


def time_epochs(flows: int, epochs: int, seed: int = 0, flow_type: str = "amortized") -> list[float]:
    torch.manual_seed(seed)
    probs = torch.as_tensor(mnist5k_raw()[mnist5k_split()[0]], dtype=torch.float32)  # 4000 rows
    cfg = VAEConfig(data_dim=784, latent_dim=40, encoder_hidden=(512,), decoder_hidden=(512,), flows=flows,
                    flow_type=flow_type)
    model = VAE(cfg).train()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    batches = GlobalBatches(len(probs), 100, Dist(), seed)
    times = []
    for epoch in range(epochs + 1):
        t = time.perf_counter()
        train_epoch(LogWeightTerms(model), opt, lambda rows: probs[rows], batches, epoch, latent_dim=40, gen=gen,
                    binarize=True)
        times.append(time.perf_counter() - t)
    return times[1:]  # the first epoch warms up allocator and kernels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values to time")
    p.add_argument("--no-record", action="store_true", help="print only, do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, flows, flow_type in (("vae", 0, "amortized"), ("flow-vae (10 global planar flows)", 10, "global"),
                                       ("flow-vae (10 amortized planar flows)", 10, "amortized")):
            times = time_epochs(flows, args.epochs, flow_type=flow_type)
            med = statistics.median(times)
            rows.append([name, threads, f"{med:.3f}", f"{min(times):.3f}", f"{max(times):.3f}"])
            print(f"{name}, {threads} thread(s): median {med:.3f} s/epoch (min {min(times):.3f}, "
                  f"max {max(times):.3f})", flush=True)
    body = ("Seconds per epoch (4,000 images, batch 100, encoder 784-512-80, decoder 40-512-784, Adam "
            f"(fused), float32), median of {args.epochs} epochs after one warm-up epoch. The peers' figures "
            "were 0.36-0.62 s/epoch; their planar flows are global, as in the 'global' row (the amortized "
            "encoder has 810 more outputs). The machine is shared: 1-minute load average "
            f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after the runs (with the cores busy, "
            "two OpenMP threads wait on each other and epochs take many times longer; `fit` uses one "
            "thread by default).\n\n"
            + table(["model", "threads", "median s/epoch", "min", "max"], rows))
    publish("VAE training speed", body, module="bench.vae_speed", save=not args.no_record)


if __name__ == "__main__":
    main()
