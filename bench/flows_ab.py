"""Training speed of this checkout's planar flows (training/flows.py) against another checkout's, in one process.

    .venv/bin/python -m bench.flows_ab --base ../before [--pairs 8]

Epoch by epoch, ABBA, the same model, optimizer and data (bench/vae_speed.py's setting: 4,000 mnist5k rows
binarized afresh each epoch, encoder 784-512-80, 10 flows, Adam, batch 100, 1 torch thread); between epochs
`training.vae` is pointed at one checkout's `planar_flows` and `planar_flows_fast` or the other's. Separate
processes a minute apart drift more on a shared machine than a flows change could move an epoch. Prints only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import training.flows as this_flows
import training.vae as vae_module
from training.data import mnist5k_raw, mnist5k_split
from training.train_vae import make_optimizer, train_epoch
from training.vae import VAE, VAEConfig


def _flows_of(checkout: Path):
    spec = importlib.util.spec_from_file_location("base_flows", checkout / "training" / "flows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. the code before a change)")
    p.add_argument("--pairs", type=int, default=8)
    args = p.parse_args(argv)
    base = _flows_of(args.base)
    impls = {"base": (base.planar_flows, base.planar_flows_fast),
             "this": (this_flows.planar_flows, this_flows.planar_flows_fast)}
    torch.set_num_threads(1)
    probs = torch.as_tensor(mnist5k_raw()[mnist5k_split()[0]], dtype=torch.float32)
    for flow_type in ("global", "amortized"):
        torch.manual_seed(0)
        model = VAE(VAEConfig(data_dim=784, latent_dim=40, encoder_hidden=(512,), decoder_hidden=(512,), flows=10,
                              flow_type=flow_type)).train()
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {"base": [], "this": []}
        for i in range(2 * args.pairs + 1):  # the first epoch warms up
            side = ("base", "this")[i % 2] if (i // 2) % 2 == 0 else ("this", "base")[i % 2]
            vae_module.planar_flows, vae_module.planar_flows_fast = impls[side]
            t = time.perf_counter()
            xs = (torch.rand(probs.shape, generator=gen) < probs).float()
            train_epoch(model, opt, xs, batch_size=100, gen=gen)
            if i:
                times[side].append(time.perf_counter() - t)
        ratios = [a / b for a, b in zip(times["this"], times["base"], strict=False)]
        print(f"flow-vae ({flow_type}, 10 flows): base median {statistics.median(times['base']):.3f} s/epoch, this "
              f"{statistics.median(times['this']):.3f}; this / base per pair of epochs: median "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
