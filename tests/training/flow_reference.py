"""The one-flow definition of a planar flow (Rezende & Mohamed 2015, eq. 10-12), written out plainly: the
reference that training/flows.py's K-flow implementations and the service's numpy flow are held to."""

from __future__ import annotations

import torch
from torch import Tensor


def planar(z: Tensor, u_hat: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """One planar flow with already-constrained u_hat: z [..., d], u_hat/w [..., d], b [...] (broadcast
    against z's leading axes). Returns (z + u_hat tanh(w^T z + b), log|1 + (1 - tanh^2) u_hat^T w|)."""
    h = torch.tanh((z * w).sum(-1) + b)
    z_new = z + u_hat * h.unsqueeze(-1)
    psi_u = (1.0 - h * h) * (w * u_hat).sum(-1)  # h'(w^T z + b) u_hat^T w
    return z_new, torch.log(torch.abs(1.0 + psi_u))
