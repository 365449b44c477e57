"""Seconds per training epoch of the VAE and the planar-flow VAE with the peers' architecture, side by side.

    .venv/bin/python -m bench.vae_speed [--rounds 3] [--epochs 3] [--threads 1 2] [--precision fp32 bf16]

Architecture as the peers': encoder 784-512-80, decoder 40-512-784, 10 planar flows, Adam, batch 100,
4,000 binarized mnist5k training images (a fresh binarization each epoch, as `fit` does). The peers'
planar flows (pyro, normflows, pythae) have global parameters, so "flow-vae (global)" is exactly their
model; "flow-vae (amortized)" is this project's default, whose encoder has K (2d + 1) = 810 more outputs
(the flow parameters of each image) on the same 512 units. An epoch is what
`training.vae_epoch.train_epoch` does in one process, the binarization included. The three models are built
and warmed up once; then each round times `--epochs` epochs of each model at each thread count in turn, so
the machine's drift shows in every row alike, and each flow model's time is also given as a ratio to the
VAE's in the same round. `--precision bf16` adds rows trained as `fit --precision bf16` does (the encoder's and
decoder's products in bfloat16 under autocast). Prints and records a section in docs/benchmarks.md.
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
from training.train_vae import PRECISIONS
from training.vae import VAE, VAEConfig
from training.vae_epoch import GlobalBatches, LogWeightTerms, make_optimizer, train_epoch

MODELS = (("vae", 0, "amortized"), ("flow-vae (10 global planar flows)", 10, "global"),
          ("flow-vae (10 amortized planar flows)", 10, "amortized"))


class Trainer:
    """One model, optimizer and data stream, trained epoch after epoch."""

    def __init__(self, flows: int, flow_type: str = "amortized", seed: int = 0, precision: str = "fp32"):
        torch.manual_seed(seed)
        self.probs = torch.as_tensor(mnist5k_raw()[mnist5k_split()[0]], dtype=torch.float32)  # 4000 rows
        cfg = VAEConfig(data_dim=784, latent_dim=40, encoder_hidden=(512,), decoder_hidden=(512,), flows=flows,
                        flow_type=flow_type)
        self.model = VAE(cfg).train()
        self.model.mlp_dtype = PRECISIONS[precision]
        self.opt = make_optimizer(self.model, lr=1e-3, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = GlobalBatches(len(self.probs), 100, Dist(), seed)
        self.epoch = 0

    def run_epoch(self) -> float:
        t = time.perf_counter()
        train_epoch(LogWeightTerms(self.model), self.opt, lambda rows: self.probs[rows], self.batches, self.epoch,
                    latent_dim=40, gen=self.gen, binarize=True)
        self.epoch += 1
        return time.perf_counter() - t


def time_epochs(flows: int, epochs: int, seed: int = 0, flow_type: str = "amortized") -> list[float]:
    trainer = Trainer(flows, flow_type, seed)
    return [trainer.run_epoch() for _ in range(epochs + 1)][1:]  # the first epoch warms up allocator and kernels


def _range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs per model, thread count and round (median taken)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values to time")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=tuple(PRECISIONS),
                   help="training precisions to time (`fit --precision`)")
    p.add_argument("--no-record", action="store_true", help="print only, do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    loads = [os.getloadavg()[0]]
    trainers = {(name if precision == "fp32" else f"{name}, {precision}"):
                Trainer(flows, flow_type, precision=precision)
                for precision in args.precision for name, flows, flow_type in MODELS}
    for trainer in trainers.values():
        trainer.run_epoch()  # warm-up
    med: dict[tuple[str, int], list[float]] = {(name, t): [] for name in trainers for t in args.threads}
    for r in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, trainer in trainers.items():
                med[name, threads].append(statistics.median(trainer.run_epoch() for _ in range(args.epochs)))
            print(f"round {r + 1}, {threads} thread(s): " + ", ".join(f"{n} {med[n, threads][-1]:.3f}"
                                                                      for n in trainers), flush=True)
        loads.append(os.getloadavg()[0])
    rows = []
    for threads in args.threads:
        vae = med["vae", threads]
        for name in trainers:
            ratios = [a / b for a, b in zip(med[name, threads], vae, strict=True)]
            rows.append([name, threads, _range(med[name, threads]), "1" if name == "vae" else _range(ratios)])
    body = ("Seconds per epoch (4,000 images, batch 100, encoder 784-512-80, decoder 40-512-784, Adam (fused), "
            f"float32 unless marked bf16): per round, the median of {args.epochs} epochs of each model after one "
            f"warm-up epoch; the table gives the median over {args.rounds} rounds (and their range), and the ratio "
            "to the VAE's epoch in the same round. The peers' figures were 0.36-0.62 s/epoch; their planar flows "
            "are global, as in the 'global' row (the amortized encoder has 810 more outputs). The machine is "
            f"shared: 1-minute load average {', '.join(f'{x:.2f}' for x in loads)} before the runs and after each "
            "round (with the cores busy, two OpenMP threads wait on each other and epochs take many times longer; "
            "`fit` uses one thread by default).\n\n"
            + table(["model", "threads", "s/epoch: median (range) over rounds", "/ vae, same round"], rows))
    publish("VAE training speed", body, module="bench.vae_speed", save=not args.no_record)


if __name__ == "__main__":
    main()
