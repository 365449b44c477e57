"""Pieces every model's training shares: devices, seeding, checkpoints, metrics files, units."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from model_repository.units import bits_per_dim, bits_per_dim_note
from training.config import DataOptions
from training.data import ImageData

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


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


def bits_figures(log_px: float | None, data: ImageData, likelihood: str) -> tuple[float | None, str | None]:
    """(bits/dim, the note saying how) of a mean log-likelihood on `data` (model_repository/units.py)."""
    bpd = None if log_px is None else bits_per_dim(log_px, data.data_dim, likelihood, data.binary)
    return bpd, bits_per_dim_note(likelihood, data.binary)


def run_meta(options: DataOptions, data: ImageData, settings: dict, history: dict | list) -> dict:
    """What a checkpoint records about its fit: the data (to reload the same split), settings, curves."""
    return {
        "dataset": str(options.dataset),
        "dataset_summary": data.summary(),
        "valid_fraction": options.valid_fraction,
        "test_fraction": options.test_fraction,
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
