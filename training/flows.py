"""Planar normalizing flows (Rezende & Mohamed, 2015, "Variational Inference with Normalizing Flows").

One flow maps f(z) = z + u_hat tanh(w^T z + b) with

    log|det df/dz| = log|1 + (1 - tanh^2(w^T z + b)) u_hat^T w|,

and is invertible when w^T u_hat >= -1, which :func:`u_hat` guarantees for any raw u (paper, appendix A):

    u_hat = u + (m(w^T u) - w^T u) w / ||w||^2,   m(a) = -1 + softplus(a),   so  w^T u_hat = m(w^T u).

Contract: every flow maps ``z -> (z_new, log_det)`` with ``log_det`` per sample (shape of ``z`` without
its last axis); a stack returns ``(z_K, sum_k log_det_k)``. Parameters come either per sample from an
encoder (*amortized*: u, w [..., K, d], b [..., K]) or as ``nn.Parameter`` shared by all samples
(*global*: :class:`GlobalPlanarFlows`). :func:`planar_flows` applies K flows given explicit
(u_hat, w, b) tensors, which is what a consumer of the exported encoder (outputs ``flow_u`` = u_hat,
``flow_w``, ``flow_b``) recomputes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

# m(a) = -1 + max(softplus(a), U_HAT_MARGIN). Where softplus(a) underflows (exactly 0 for a < -104 in
# float32, a < -745 in float64) the paper's m(a) is exactly -1, so w^T u_hat = -1 and the Jacobian
# 1 + (1 - tanh^2) w^T u_hat is exactly 0 where w^T z + b = 0: a non-invertible flow and log|det| = -inf.
# Clamping softplus from below keeps w^T u_hat >= -1 + 1e-4, so |det J| >= 1e-4 (log|det J| >= -9.2)
# everywhere: the flow stays strictly invertible, and the bound stays a bound (no term is altered
# inside a log). 1e-4 is wide against the float32 roundoff of recomputing w^T u_hat from an exported
# u_hat (~1e-6 for |w^T u| ~ 10). The clamp is inactive (m is exactly the paper's) for a > -9.2.
U_HAT_MARGIN = 1e-4


def m(a: Tensor) -> Tensor:
    """m(a) = -1 + softplus(a), its softplus clamped from below by :data:`U_HAT_MARGIN` (see there)."""
    return -1.0 + softplus(a).clamp_min(U_HAT_MARGIN)


def u_hat(u: Tensor, w: Tensor) -> Tensor:
    """The constrained u of a planar flow: u_hat = u + (m(w^T u) - w^T u) w / ||w||^2 (so w^T u_hat >= -1).

    u, w: [..., d] (matching shapes). Returns [..., d].
    """
    if u.shape != w.shape:
        raise ValueError(f"u and w must have the same shape [..., d], got {tuple(u.shape)} and {tuple(w.shape)}")
    wu = (w * u).sum(-1, keepdim=True)
    return u + (m(wu) - wu) * w / (w * w).sum(-1, keepdim=True)


def planar_flows(z: Tensor, u_hat: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """K planar flows in sequence: z [..., d]; u_hat, w [..., K, d]; b [..., K], whose leading axes
    broadcast against z's (e.g. z [N, S, d] with u_hat [N, 1, K, d], or global u_hat [K, d]).

    Returns (z_K [..., d], sum_k log|det J_k| [...]). K = 0 returns (z, zeros).
    """
    if u_hat.shape != w.shape or u_hat.shape[:-1] != b.shape:
        raise ValueError(f"expected u_hat, w [..., K, d] and b [..., K], got {tuple(u_hat.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)}")
    if u_hat.shape[-1] != z.shape[-1]:
        raise ValueError(f"flow parameters have d = {u_hat.shape[-1]}, z has d = {z.shape[-1]}")
    if u_hat.shape[-2] == 0:
        return z, torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    z, h, _ = _forward(z, u_hat, w, b)
    wu = torch.linalg.vecdot(w, u_hat)  # w_k^T u_hat_k [..., K], broadcast against h
    log_det = torch.log(torch.abs(1.0 + (1.0 - h * h) * wu)).sum(-1)
    return z, log_det


def _forward(z: Tensor, u_hat: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The K flows' pass: (z_K, h [..., K] the tanh of each flow, [z_0, ..., z_{K-1}] their inputs).

    Few autograd nodes (one per line, three per flow): the log-dets of all K flows are computed afterwards
    from the stacked tanh values."""
    zs, hs = [], []
    for uk, wk, bk in zip(u_hat.unbind(-2), w.unbind(-2), b.unbind(-1), strict=True):
        zs.append(z)
        h = torch.tanh(torch.linalg.vecdot(z, wk) + bk)
        z = torch.addcmul(z, uk, h.unsqueeze(-1))  # z + u_hat h
        hs.append(h)
    return z, torch.stack(hs, -1), zs


class _FusedFlowsFunction(torch.autograd.Function):
    """:func:`u_hat` then :func:`planar_flows` for one set of raw parameters per row, forward and backward by hand.

    Shapes: z [N, S, d]; raw u, w [N, K, d]; b [N, K]. The flows run on z augmented with a constant 1 and
    w with b (so w^T z + b is one dot product, and dL/db comes out of dL/dw), u_hat with a 0. The step's
    inputs z_{k-1}, tanh values h_k, dL/dz_k and dL/da_k (ga) go into preallocated [N, S, K, .] buffers,
    and the parameter gradients are then a few batched products after the loop:
        dL/dw_k = sum_s ga_k z_{k-1},  dL/dU_hat_k = sum_s h_k dL/dz_k,  dL/dz_{k-1} = dL/dz_k + ga_k w_k,
        ga_k = (dL/dz_k^T u_hat_k - 2 l h_k psi_k / D_k)(1 - h_k^2)
    (psi_k = w_k^T u_hat_k, D_k = 1 + (1 - h_k^2) psi_k, l = dL/d(log_det)), then the chain through u_hat.
    Why: the step's tensors are small ([N, d]), so its time is operator calls, not FLOPs; this makes the
    fewest per flow step and removes u_hat's autograd nodes.
    """

    @staticmethod
    def forward(ctx, z, u, w, b):
        N, S, d = z.shape
        K = u.shape[1]
        wu, ww = (w * u).sum(-1, keepdim=True), (w * w).sum(-1, keepdim=True)
        sp = softplus(wu)
        m_wu = -1.0 + sp.clamp_min(U_HAT_MARGIN)
        uh = u + (m_wu - wu) * w / ww  # u_hat(u, w), the same operations
        psi = torch.linalg.vecdot(w, uh)
        wb = torch.cat([w, b.unsqueeze(-1)], -1).unsqueeze(1)  # [N, 1, K, d + 1]
        uh0 = torch.nn.functional.pad(uh, (0, 1)).unsqueeze(1)
        Z = z.new_empty(N, S, K + 1, d + 1)  # z_0, ..., z_K, each with a trailing 1
        Z[..., 0, d] = 1.0
        Z[..., 0, :d] = z
        H = z.new_empty(N, S, K, 1)
        zs, hs = Z.unbind(2), H.unbind(2)  # views made in one call each, not one indexing per step
        for zk, z_next, hk, wk, uk in zip(zs, zs[1:], hs, wb.unbind(2), uh0.unbind(2), strict=False):
            torch.tanh((zk * wk).sum(-1, keepdim=True), out=hk)
            torch.addcmul(zk, uk, hk, out=z_next)
        H = H.squeeze(-1)
        dh = 1.0 - H * H  # tanh'(a_k) [N, S, K]
        det = 1.0 + dh * psi.unsqueeze(1)
        ctx.save_for_backward(u, w, uh, Z, H, dh, psi, det, wb, uh0, wu, ww, sp, m_wu)
        return Z[..., K, :d].contiguous(), torch.log(torch.abs(det)).sum(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, g_log_det):
        u, w, uh, Z, H, dh, psi, det, wb, uh0, wu, ww, sp, m_wu = ctx.saved_tensors
        N, S, K1, d1 = Z.shape
        K, d = K1 - 1, d1 - 1
        gl_det = g_log_det.unsqueeze(-1) * (dh / det)  # dL/d(log_det) times d log|D_k| / d psi_k
        q = gl_det * H * (-2.0 * psi).unsqueeze(1)  # log|D_k|'s share of dL/da_k
        G = Z.new_empty(N, S, K + 1, d + 1)  # slot k: dL/dz_k (augmented; slot 0 is dL/dz_0)
        G[..., K, d] = 0.0
        G[..., K, :d] = g
        GA = H.new_empty(N, S, K, 1)
        gs, gas = G.unbind(2), GA.unbind(2)
        steps = zip(gs[1:], gs, gas, q.unsqueeze(-1).unbind(2), dh.unsqueeze(-1).unbind(2), wb.unbind(2),
                    uh0.unbind(2), strict=False)
        for gk, g_prev, ga, qk, dhk, wk, uk in reversed(list(steps)):  # flow k + 1: slot k -> slot k + 1
            torch.addcmul(qk, (gk * uk).sum(-1, keepdim=True), dhk, out=ga)
            torch.addcmul(gk, wk, ga, out=g_prev)
        GA = GA.squeeze(-1)
        g_psi = _sum_samples(gl_det).unsqueeze(-1)  # [N, K, 1]
        g_uh = _sum_samples(G[..., 1:, :d] * H.unsqueeze(-1)).addcmul_(g_psi, w)
        g_wb = _sum_samples(Z[..., :K, :] * GA.unsqueeze(-1))  # [N, K, d + 1]: dL/dw and dL/db
        g_w = g_wb[..., :d].addcmul(g_psi, uh)
        # through u_hat = u + c w, c = (m(a) - a) / ||w||^2, a = w^T u; m'(a) = sigmoid(a) where unclamped
        dm = torch.where(sp >= U_HAT_MARGIN, torch.sigmoid(wu), 0.0)
        s = (g_uh * w).sum(-1, keepdim=True)
        c = (m_wu - wu) / ww
        sa = s * (dm - 1.0) / ww
        g_u = torch.addcmul(g_uh, sa, w)
        g_w = g_w.addcmul_(c, g_uh).addcmul_(sa, u).addcmul_(-2.0 * s * c / ww, w)
        return G[..., 0, :d].contiguous(), g_u, g_w, g_wb[..., d]


def _sum_samples(t: Tensor) -> Tensor:
    """t summed over its sample axis (1); a view for one sample (the training case), no operator call."""
    return t.squeeze(1) if t.shape[1] == 1 else t.sum(1)


def fused_planar_flows(z: Tensor, u: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``planar_flows(z, u_hat(u, w)[:, None], w[:, None], b[:, None])`` (values equal up to float rounding)
    for raw parameters u, w [N, K, d], b [N, K] of each row and z [N, S, d], with a hand-written backward
    (global flows: N = 1, all samples in S).

    For training; not for export or double differentiation (:func:`planar_flows` is the reference)."""
    N, K, d = u.shape
    if w.shape != u.shape or b.shape != (N, K) or z.dim() != 3 or z.shape[0] != N or z.shape[2] != d:
        raise ValueError(f"expected z [N, S, d], u and w [N, K, d], b [N, K]; got {tuple(z.shape)}, "
                         f"{tuple(u.shape)}, {tuple(w.shape)}, {tuple(b.shape)}")
    if K == 0:
        return z, torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    return _FusedFlowsFunction.apply(z, u, w, b)


class GlobalPlanarFlows(nn.Module):
    """K planar flows whose parameters are shared by all samples (``nn.Parameter`` u, w [K, d], b [K])."""

    def __init__(self, latent_dim: int, flows: int):
        super().__init__()
        # w, u ~ N(0, 1/d): ||w|| ~ 1, so u_hat = u + (m - w^T u) w / ||w||^2 starts O(1), not huge.
        self.u = nn.Parameter(torch.randn(flows, latent_dim) / latent_dim**0.5)
        self.w = nn.Parameter(torch.randn(flows, latent_dim) / latent_dim**0.5)
        self.b = nn.Parameter(torch.zeros(flows))

    def params(self) -> tuple[Tensor, Tensor, Tensor]:
        """(u_hat [K, d], w [K, d], b [K]), u_hat computed once for the whole batch."""
        return u_hat(self.u, self.w), self.w, self.b

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.shape[-1] != self.u.shape[-1]:
            raise ValueError(f"expected z [..., {self.u.shape[-1]}], got {tuple(z.shape)}")
        return planar_flows(z, *self.params())
