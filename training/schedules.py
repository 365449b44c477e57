"""Per-step schedules of a VAE fit: the learning rate (`--lr-warmup-epochs`, `--lr-schedule`) and the KL
weight beta (`--warmup-epochs`, `--kl-schedule`). Steps are Adam steps, counted from 0 over the whole fit.

    lr(s)   = lr min(1, (s + 1) / L)                           for s < L (linear warm-up, L warm-up steps)
            = lr (1 + cos(pi (s - L) / (T - L))) / 2           cosine: from lr at s = L to 0 at s = T
            = lr                                               constant
    beta(s) = min(1, (s + 1) / A)                              linear KL warm-up over A steps
            = (1 - cos(pi min(1, (s + 1) / A))) / 2            cosine: slow start and slow finish
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "cosine")
KL_SCHEDULES = ("linear", "cosine")


def learning_rate(step: int, *, lr: float, schedule: str, total_steps: int, warmup_steps: float = 0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return lr * min(1.0, (step + 1) / warmup_steps)  # a fractional last warm-up step stops at lr
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
    if schedule == "constant":
        return lr
    raise ValueError(f"learning-rate schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def kl_weight(step: int, *, warmup_steps: float, schedule: str = "linear") -> float:
    """beta for optimizer step `step` (0-based): the weight of log p(z) - log q(z|x) + log det in the loss."""
    if warmup_steps <= 0:
        return 1.0
    t = min(1.0, (step + 1) / warmup_steps)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"KL schedule must be one of {KL_SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class Schedule:
    """(learning rate, beta) per step, the `schedule` that training/vae_epoch.py's train_epoch calls."""

    lr: float
    lr_schedule: str
    total_steps: int
    lr_warmup_steps: float = 0
    kl_warmup_steps: float = 0
    kl_schedule: str = "linear"

    def __call__(self, step: int) -> tuple[float, float]:
        return (learning_rate(step, lr=self.lr, schedule=self.lr_schedule, total_steps=self.total_steps,
                              warmup_steps=self.lr_warmup_steps),
                kl_weight(step, warmup_steps=self.kl_warmup_steps, schedule=self.kl_schedule))
