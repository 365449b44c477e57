"""Training speed of this checkout's flow-VAE (training/flows.py and training/vae.py) against another checkout's, in
one process.

    .venv/bin/python -m bench.flows_ab --base ../before [--pairs 8] [--threads 1]

Epoch by epoch, ABBA, the same model, optimizer and data (bench/vae_speed.py's setting: 4,000 mnist5k rows
binarized afresh each epoch, encoder 784-512-80, 10 flows, Adam, batch 100); between epochs the model's class is
switched between this checkout's `VAE` and the other checkout's (its training/vae.py with its own
training/flows.py), which share their parameters' layout. Separate processes a minute apart drift more on a
shared machine than a flows change could move an epoch. Prints only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import training.flows
from training.data import mnist5k_raw, mnist5k_split
from training.distributed import Dist
from training.vae import VAE, VAEConfig
from training.vae_epoch import GlobalBatches, LogWeightTerms, make_optimizer, train_epoch


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _vae_class_of(checkout: Path) -> type:
    """The other checkout's VAE class, its `training.flows` imports resolved to that checkout's flows.py."""
    base_flows = _load("base_flows", checkout / "training" / "flows.py")
    sys.modules["training.flows"] = base_flows
    try:
        return _load("base_vae", checkout / "training" / "vae.py").VAE
    finally:
        sys.modules["training.flows"] = training.flows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the other checkout (e.g. the code before a change)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    classes = {"base": _vae_class_of(args.base), "this": VAE}
    torch.set_num_threads(args.threads)
    probs = torch.as_tensor(mnist5k_raw()[mnist5k_split()[0]], dtype=torch.float32)
    for flow_type in ("global", "amortized"):
        torch.manual_seed(0)
        model = VAE(VAEConfig(data_dim=784, latent_dim=40, encoder_hidden=(512,), decoder_hidden=(512,), flows=10,
                              flow_type=flow_type)).train()
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        batches = GlobalBatches(len(probs), 100, Dist(), 0)
        times: dict[str, list[tuple[float, float]]] = {"base": [], "this": []}
        for i in range(2 * args.pairs + 1):  # the first epoch warms up
            side = ("base", "this")[i % 2] if (i // 2) % 2 == 0 else ("this", "base")[i % 2]
            model.__class__ = classes[side]
            t, cpu = time.perf_counter(), time.process_time()
            train_epoch(LogWeightTerms(model), opt, lambda rows: probs[rows], batches, i, latent_dim=40, gen=gen,
                        binarize=True)
            if i:
                times[side].append((time.perf_counter() - t, time.process_time() - cpu))
        # CPU seconds too: with one thread on a busy machine they leave out the waits for a core
        for j, what in enumerate(("wall s", "CPU s")):
            this, base = ([x[j] for x in times[side]] for side in ("this", "base"))
            ratios = [a / b for a, b in zip(this, base, strict=False)]
            print(f"flow-vae ({flow_type}, 10 flows, {args.threads} thread(s)), {what}/epoch: base median "
                  f"{statistics.median(base):.3f}, this {statistics.median(this):.3f}; this / base per pair of "
                  f"epochs: median {statistics.median(ratios):.3f} (range {min(ratios):.2f}-{max(ratios):.2f}, "
                  f"{len(ratios)} pairs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
