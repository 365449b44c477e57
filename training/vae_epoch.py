"""One epoch of VAE training by global batches, in one process or over the ranks of a torchrun fit.

`--batch-size` B is the global batch whatever the world size W: each step, each rank takes B / W rows,
dealt by a DistributedSampler (seeded with the fit's seed, re-shuffled each epoch by ``set_epoch``): the
epoch's order is padded to a multiple of W and rank r takes its positions r, r + W, r + 2W, ... . The rows
of global step s are then positions [sB, (s + 1)B) of the order, exactly those of one process with the same
seed; the rows DistributedSampler pads with (copies of the first ones, when W does not divide N) are
skipped, so no row counts twice.

Per-row randomness (the reparametrization noise eps and, for dynamic binarization, the uniforms that
binarize the batch) is drawn for the whole global batch from a generator that every rank holds in the same
state; each rank keeps its own rows' draws. Each rank's loss is its rows' share of the global batch mean
times W, and DistributedDataParallel averages the ranks' gradients, so every rank takes the one-process
step on the global batch, up to the rounding of the summed gradients.

Objectives (`--objective`, `--k`): each row draws k samples and gets k log-weights log w_i;
"elbo" averages them (k = 1: the one-sample ELBO; k > 1: the same objective with a lower-variance
gradient), "iwae" (Burda et al., 2016) maximises logsumexp_i(log w_i) - log k, a bound that tightens as k
grows. During the KL warm-up the log-weights are log p(x|z) + beta (log p(z) - log q_0 + log det).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

from training.distributed import Dist
from training.vae import VAE

OBJECTIVES = ("elbo", "iwae")


class LogWeightTerms(nn.Module):
    """The VAE's log-weight terms as a module's forward: DistributedDataParallel synchronises gradients
    only for what runs through a forward."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.vae.log_weight_terms(x, eps)


def objective_rows(log_w: Tensor, objective: str) -> Tensor:
    """Per row [N] of log-weights [N, k]: their mean ("elbo") or logsumexp - log k ("iwae")."""
    if objective == "iwae":
        return torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1])
    if objective == "elbo":
        return log_w.mean(1)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


class GlobalBatches:
    """This rank's rows of each global step over `n` training rows."""

    def __init__(self, n: int, batch_size: int, dist: Dist, seed: int):
        W = dist.world_size
        if batch_size < 1 or batch_size % W:
            raise ValueError(f"--batch-size {batch_size} is the global batch of all {W} ranks and must be a positive "
                             f"multiple of the world size {W}")
        self.n, self.batch_size, self.local, self.dist = n, batch_size, batch_size // W, dist
        self.sampler = DistributedSampler(range(n), num_replicas=W, rank=dist.rank, shuffle=True, seed=seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Per global step: (rows in the global batch, this rank's rows as positions among the n, and their
        places in the global batch), positions and places as int64 tensors on the rank's device."""
        self.sampler.set_epoch(epoch)
        W, r, B, b = self.dist.world_size, self.dist.rank, self.batch_size, self.local
        device = self.dist.device
        mine = torch.tensor(list(self.sampler), dtype=torch.long)  # this rank's share of the padded order
        order = r + W * torch.arange(len(mine))  # where each stands in the padded order
        for s in range(self.steps_per_epoch):
            rows, place = mine[s * b : (s + 1) * b], order[s * b : (s + 1) * b]
            real = place < self.n  # not one of the sampler's padding copies
            yield min(B, self.n - s * B), rows[real].to(device), (place[real] - s * B).to(device)


def train_epoch(forward: nn.Module, opt: torch.optim.Optimizer, fetch: Callable[[Tensor], Tensor],
                batches: GlobalBatches, epoch: int, *, latent_dim: int, gen: torch.Generator, binarize: bool,
                step: int = 0, schedule=None, objective: str = "elbo", k: int = 1) -> tuple[Tensor, int]:
    """One pass over the training rows in an order shuffled for `epoch`, one Adam step per global batch.

    loss = -mean over the global batch of objective_rows(log w^beta), log w^beta = log p(x|z_K)
    + beta (log p(z_K) - log q_0(z_0|x) + sum log|det J|) for k samples per row, with (lr, beta) =
    schedule(step) (beta = 1 and a fixed lr without one). `forward` is a
    :class:`LogWeightTerms` (in DistributedDataParallel over ranks); `fetch` gives the rows at positions
    (continuous intensities when `binarize`). Returns this rank's sum of the ELBO estimates (the mean of
    log w at beta = 1 over the k samples, float64, a tensor: no device sync per step) and the next step number.
    """
    W = batches.dist.world_size
    elbo_sum = torch.zeros((), dtype=torch.float64, device=batches.dist.device)
    for n_step, rows, place in batches.epoch(epoch):
        x = fetch(rows)
        if binarize:  # each pixel 1 with probability its intensity, as training.data.binarize
            u = torch.rand((n_step, x.shape[1]), generator=gen, dtype=x.dtype, device=x.device)
            x = (u[place] < x).to(x.dtype)
        eps = torch.randn((n_step, k, latent_dim), generator=gen, dtype=x.dtype, device=x.device)[place]
        if batches.dist.enabled:  # DDP's forward communicates too (the buckets' rebuild after the first step)
            terms = batches.dist.collective("the forward pass's synchronisation", functools.partial(forward, x, eps))
        else:
            terms = forward(x, eps)
        log_px_z, log_pz, log_q0, log_det = terms
        kl_part = log_pz - log_q0 + log_det  # per sample, an estimate of -KL(q(z_K|x) || p(z_K))
        lr, beta = schedule(step) if schedule is not None else (None, 1.0)
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        # DDP averages the W ranks' gradients: W times this rank's share of the batch sum gives the batch mean.
        loss = -objective_rows(log_px_z + beta * kl_part, objective).sum() * (W / n_step)
        opt.zero_grad(set_to_none=True)
        batches.dist.collective("the gradients' all-reduce in backward", loss.backward)  # DDP all-reduces here
        opt.step()
        elbo_sum += (log_px_z + kl_part).detach().mean(1).sum().double()
        step += 1
    return elbo_sum, step


def make_optimizer(model: VAE, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay (Adam when it is 0), fused where the device has the kernel."""
    cls = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    try:  # one fused kernel per step instead of a handful of ops per parameter tensor
        return cls(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # pragma: no cover - devices without a fused Adam
        return cls(model.parameters(), **kwargs)
