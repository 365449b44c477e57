"""Pieces every model's training shares: devices, seeding, checkpoints, metrics files, units."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from training.data import TEST_FRACTION

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
LOG2 = math.log(2.0)


def resolve_device(name: str = "auto"):
    """`auto` picks CUDA when present, else the CPU; `cpu`, `cuda`, `cuda:1` are taken as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: expected 'auto', 'cpu' or 'cuda[:N]'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device here; use --device auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)


def bits_per_dim(log_px: float, data_dim: int, *, discrete_bins: int | None) -> float:
    """Bits per dimension of a log-likelihood in nats per image.

    For binary data (``discrete_bins=None``) the likelihood is already a probability mass:
    bpd = -log p(x) / (D ln 2). For a density on [0, 1]^D, the data are read as ``discrete_bins``
    levels per pixel, each a bin of width 1/bins, so log P(bin) ~= log p(x) - D log(bins):
    bpd = -(log p(x) - D log bins) / (D ln 2).
    """
    if discrete_bins is None:
        return -log_px / (data_dim * LOG2)
    return -(log_px - data_dim * math.log(discrete_bins)) / (data_dim * LOG2)


def run_meta(args, data, settings: dict, history: dict | list) -> dict:
    """What a checkpoint records about its fit: the data (to reload the same split), settings, curves."""
    return {
        "dataset": str(args.dataset),
        "dataset_summary": data.summary(),
        "valid_fraction": args.valid_fraction,
        "test_fraction": getattr(args, "test_fraction", TEST_FRACTION),
        "image_shape": list(data.image_shape),
        "channels": data.channels,
        "training": settings,
        "history": history,
    }


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(out_dir: str | Path, *, kind: str, config: dict, state_dict: dict, meta: dict) -> Path:
    """One file per fitted model: what it is (kind, config), its weights, and how it was trained."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save({"kind": kind, "config": config, "state_dict": state_dict, "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; `path` is the file or its folder."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (expected a folder written by "
                                f"'python -m training fit' or its {CHECKPOINT})")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"kind", "config", "state_dict", "meta"} - set(ckpt)
    if missing:
        raise ValueError(f"{path}: not a latentserve checkpoint (missing {sorted(missing)})")
    return ckpt
