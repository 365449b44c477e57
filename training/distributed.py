"""Fitting across processes with torch.distributed, as launched by torchrun (or a PyTorchJob, Slurm, ...):

    torchrun --nproc-per-node 2 -m training fit --model vae --dataset mnist5k-bin --out runs/vae

:func:`setup` reads the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) when it
is called, never at import: without WORLD_SIZE > 1 it returns a one-process :class:`Dist` and nothing
changes. Under torchrun every rank takes one device: the CPU with the gloo backend, or the GPU of its
LOCAL_RANK with nccl. Each collective waits at most ``timeout_s`` for the other ranks; a rank that dies
or hangs ends the job with a :class:`PeerError` that says so, not a hang.

The fits use three kinds of collective, all through :class:`Dist`:

* :meth:`Dist.sum` -- sums of float64 tensors in one all-reduce. Every figure that spans ranks is a sum and
  a count, so a mean over W ranks is the mean over all rows, whatever the rows per rank;
* :meth:`Dist.decide` -- rank 0's decision for all ranks, for anything read off a clock;
* :meth:`Dist.gather` -- small Python objects (errors found in a rank's own rows), so all ranks stop together.

Only rank 0 writes files; :attr:`Dist.is_main` says which one that is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from training.config import RunOptions

# How long a rank waits in a collective for the others before the job stops: the fit setting's default
# (training/config.py RunOptions.dist_timeout, with its reason).
DEFAULT_TIMEOUT_S = RunOptions.dist_timeout
# Per-rank seeds for randomness that must differ between ranks (their own evaluation noise, their own
# stochastic-EM draws): rank r uses seed + SEED_STRIDE * r, so rank 0 keeps the one-process stream.
SEED_STRIDE = 1_000_003


class PeerError(RuntimeError):
    """A collective failed or timed out: another rank died or hung, or the network between them broke."""


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks of a fit: one process (the default) or a torchrun rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo or nccl; None for one process
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes checkpoints, metrics, plots and exports, and prints."""
        return self.rank == 0

    def record(self) -> dict:
        """What metrics.json and the model card's training section say about the processes of the fit."""
        return {"world_size": self.world_size, "backend": self.backend}

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items: rank r takes [n r / W, n (r + 1) / W), sizes within 1."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def rank_seed(self, seed: int) -> int:
        return seed + SEED_STRIDE * self.rank

    # -- collectives ----------------------------------------------------------------------------

    def sum(self, *values: Tensor | float) -> tuple[Tensor, ...]:
        """Each value summed over the ranks, as float64 on this rank's device, in one all-reduce.

        Values are packed into one buffer: a fit's statistics travel in one message whatever their number.
        """
        flat = [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values]
        if not self.enabled:
            return tuple(flat)
        buf = torch.cat([v.reshape(-1) for v in flat])
        self.collective("an all-reduce of sums", lambda: torch.distributed.all_reduce(buf))
        out, start = [], 0
        for v in flat:
            out.append(buf[start : start + v.numel()].reshape(v.shape))
            start += v.numel()
        return tuple(out)

    def decide(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (for decisions read off a clock, which differs between hosts)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.collective("a broadcast from rank 0", lambda: torch.distributed.broadcast(t, src=0))
        return bool(t.item())

    def gather(self, obj: Any) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        self.collective("a gather of objects", lambda: torch.distributed.all_gather_object(out, obj))
        return out

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DistributedDataParallel across the ranks (gradients averaged in backward); as it is alone."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return self.collective("wrapping the model in DistributedDataParallel",
                                lambda: DistributedDataParallel(module, device_ids=ids))

    def collective(self, what: str, run: Callable[[], Any]) -> Any:
        """run(), which communicates with the other ranks; its failure becomes a PeerError that says what happened."""
        try:
            return run()
        except RuntimeError as e:  # gloo and nccl failures (DistBackendError included) are RuntimeErrors
            raise PeerError(
                f"rank {self.rank} of {self.world_size}: {what} failed, so the job stops: another rank died or "
                f"hung, or the network between the ranks broke (each collective waits at most {self.timeout_s:g} s, "
                f"--dist-timeout). The first rank to fail says why. Cause: {str(e).splitlines()[0][:300]}"
            ) from e

    def close(self, *, wait: bool = False) -> None:
        """Leave the process group; with `wait` (a fit that ended well), once every rank is here: a rank that
        tears gloo down while rank 0 still writes its files can abort ("terminate called ...")."""
        if self.enabled and torch.distributed.is_initialized():
            if wait:
                self.collective("the ranks' last barrier", torch.distributed.barrier)
            torch.distributed.destroy_process_group()


def single(device: str = "auto") -> Dist:
    """One process on `device` (see :func:`training.common.resolve_device`)."""
    from training.common import resolve_device

    return Dist(device=resolve_device(device))


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """This process's :class:`Dist`: a rank of a process group when launched with WORLD_SIZE > 1, else one process.

    `device`: auto (the GPU of LOCAL_RANK when torch sees GPUs, else the CPU), cpu, or cuda (the GPU of
    LOCAL_RANK). A fixed cuda:N would put every rank of a host on one GPU and is refused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return single(device)
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _rank_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist = Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=dev, timeout_s=timeout_s)
    if not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.collective("joining the process group", lambda: torch.distributed.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=dev if dev.type == "cuda" else None))
    return dist


def _rank_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"--device {name!r} under torchrun: expected auto, cpu or cuda (each rank takes the GPU "
                         "of its LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= count:
        raise ValueError(f"--device cuda: LOCAL_RANK {local_rank} has no GPU (torch sees {count}); start at most "
                         f"{count} processes per host (--nproc-per-node), or use --device cpu")
    return torch.device("cuda", local_rank)
