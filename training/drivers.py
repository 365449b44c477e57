"""The model kinds training can fit: kind -> driver, and what a driver provides.

A driver module fits one family of models, writes its checkpoint and metrics, evaluates a checkpoint and
rebuilds its torch module for export. Adding a kind: a driver module satisfying :class:`Driver`, a line in
`DRIVERS`, its graphs in training/export.py, and the kind in the contract (model_repository/graphs.py
REQUIRED_GRAPHS); docs/architecture.md walks through it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the drivers import torch; the registry itself stays light for the command line
    from torch import nn

    from training.config import FitJob
    from training.data import ImageData
    from training.distributed import Dist

# kind -> driver module (imported on first use: each pulls in torch)
DRIVERS = {
    "ppca": "training.train_ppca",
    "vae": "training.train_vae",
    "flow-vae": "training.train_vae",
}


class Driver(Protocol):
    Options: type  # the kind's fit settings: a dataclass of training.config.option fields

    def fit(self, job: FitJob, data: ImageData, out: Path, dist: Dist | None = None) -> dict[str, Any]:
        """Fit `job.model` on `data`; write the checkpoint, metrics.json and plots into `out`; the metrics.
        Under torchrun `dist` is this rank's: sums are reduced over the ranks, and only rank 0 writes."""

    def evaluate(self, ckpt: dict, *, samples: int, seed: int, device: str) -> dict[str, Any]:
        """Test figures of a checkpoint (`samples` importance samples where the bound needs them)."""

    def build_model(self, ckpt: dict) -> nn.Module:
        """The fitted torch module of a checkpoint, in eval mode on the CPU."""


def driver_for(kind: str) -> Driver:
    try:
        module = DRIVERS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {', '.join(DRIVERS)}") from None
    return importlib.import_module(module)  # type: ignore[return-value]  # a module satisfying Driver
