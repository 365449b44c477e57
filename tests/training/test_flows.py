"""Planar flows against autograd Jacobians, the invertibility constraint and its underflow margin."""

import math

import pytest
import torch
from flow_reference import planar
from torch.autograd.functional import jacobian

from training.flows import (
    U_HAT_MARGIN,
    GlobalPlanarFlows,
    fused_planar_flows,
    m,
    planar_flows,
    u_hat,
)


def _params(K: int, d: int, gen: torch.Generator, dtype=torch.float64, wu_shift: float = -3.0):
    """Raw (u, w, b) for K flows; u gets a component along w so that w^T u = wu_shift + O(noise) < -1."""
    w = torch.randn(K, d, generator=gen, dtype=dtype)
    u = torch.randn(K, d, generator=gen, dtype=dtype) * 0.3
    u = u + (wu_shift - (w * u).sum(-1, keepdim=True)) * w / (w * w).sum(-1, keepdim=True)
    b = torch.randn(K, generator=gen, dtype=dtype)
    return u, w, b


def test_u_hat_satisfies_the_constraint_and_the_paper_formula():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 6, generator=gen, dtype=torch.float64) * torch.rand(1000, 1, generator=gen) * 3
    u = torch.randn(1000, 6, generator=gen, dtype=torch.float64) * 5
    uh = u_hat(u, w)
    wu, wuh = (w * u).sum(-1), (w * uh).sum(-1)
    assert (wu < -1).sum() > 100  # plenty of raw parameters that violate the constraint
    assert (wuh >= -1 + U_HAT_MARGIN - 1e-12).all()
    # w^T u_hat = m(w^T u) = -1 + softplus(w^T u) (paper, appendix A) where the margin is inactive
    torch.testing.assert_close(wuh, -1 + torch.nn.functional.softplus(wu).clamp_min(U_HAT_MARGIN))
    # u_hat only moves u along w
    perp = uh - u - ((w * (uh - u)).sum(-1, keepdim=True) / (w * w).sum(-1, keepdim=True)) * w
    assert perp.abs().max() < 1e-10
    with pytest.raises(ValueError, match=r"same shape .* got \(3, 2\) and \(3, 4\)"):
        u_hat(torch.zeros(3, 2), torch.zeros(3, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_det_matches_autograd_jacobian(seed):
    gen = torch.Generator().manual_seed(seed)
    d = 5
    u, w, b = _params(1, d, gen)
    assert (w * u).sum() < -1  # raw parameters outside the invertible set; u_hat repairs them
    uh = u_hat(u, w)[0]
    for _ in range(5):
        z = torch.randn(d, generator=gen, dtype=torch.float64) * 2
        J = jacobian(lambda z: planar(z, uh, w[0], b[0])[0], z)
        _, log_det = planar(z, uh, w[0], b[0])
        sign, ref = torch.linalg.slogdet(J)
        assert sign > 0  # invertible, orientation preserving: 1 + h' w^T u_hat > 0
        assert abs(log_det.item() - ref.item()) < 1e-8


def test_stack_log_det_is_the_sum_and_matches_the_composed_jacobian():
    gen = torch.Generator().manual_seed(3)
    K, d = 4, 3
    u, w, b = _params(K, d, gen)
    uh = u_hat(u, w)
    z0 = torch.randn(7, d, generator=gen, dtype=torch.float64)
    zK, log_det = planar_flows(z0, uh, w, b)
    assert zK.shape == (7, d) and log_det.shape == (7,)
    # step by step with the single-flow function
    z, total = z0, torch.zeros(7, dtype=torch.float64)
    for k in range(K):
        z, ld = planar(z, uh[k], w[k], b[k])
        total = total + ld
    torch.testing.assert_close(zK, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det, total, rtol=0, atol=1e-12)
    # and the log|det| of the whole composition's Jacobian
    for n in range(3):
        J = jacobian(lambda z: planar_flows(z, uh, w, b)[0], z0[n])
        assert abs(log_det[n].item() - torch.linalg.slogdet(J)[1].item()) < 1e-8


def test_per_sample_parameters_broadcast_over_samples():
    gen = torch.Generator().manual_seed(4)
    N, S, K, d = 3, 5, 2, 4
    u = torch.randn(N, K, d, generator=gen, dtype=torch.float64)
    w = torch.randn(N, K, d, generator=gen, dtype=torch.float64)
    b = torch.randn(N, K, generator=gen, dtype=torch.float64)
    uh = u_hat(u, w)
    z = torch.randn(N, S, d, generator=gen, dtype=torch.float64)
    zK, log_det = planar_flows(z, uh.unsqueeze(1), w.unsqueeze(1), b.unsqueeze(1))
    assert zK.shape == (N, S, d) and log_det.shape == (N, S)
    for n in range(N):
        ref_z, ref_ld = planar_flows(z[n], uh[n], w[n], b[n])
        torch.testing.assert_close(zK[n], ref_z)
        torch.testing.assert_close(log_det[n], ref_ld)


def test_finite_where_softplus_underflows():
    # w^T u = -1e4: softplus underflows to exactly 0, so without the margin w^T u_hat = -1 and the
    # Jacobian is exactly singular where w^T z + b = 0.
    d = 3
    w = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[-5e3, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0], dtype=torch.float64)
    assert torch.nn.functional.softplus((w * u).sum()).item() == 0.0
    uh = u_hat(u, w)
    assert (w * uh).sum().item() == pytest.approx(-1 + U_HAT_MARGIN, abs=1e-12)
    z = torch.zeros(1, d, dtype=torch.float64)  # w^T z + b = 0: tanh' = 1, the worst point
    zK, log_det = planar_flows(z, uh, w, b)
    assert torch.isfinite(zK).all()
    assert log_det.item() == pytest.approx(math.log(U_HAT_MARGIN), rel=1e-9)
    log_det.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(u.grad).all()
    # float32: softplus underflows below about -104
    w32, u32 = w.detach().float(), torch.tensor([[-100.0, 1.0, 0.0]])
    assert m((w32 * u32).sum()).item() == pytest.approx(-1 + U_HAT_MARGIN)
    _, ld32 = planar_flows(z.float(), u_hat(u32, w32), w32, b.float())
    assert torch.isfinite(ld32).all() and ld32.item() == pytest.approx(math.log(U_HAT_MARGIN), rel=0.05)


def test_constraint_holds_after_training_steps_that_push_against_it():
    torch.manual_seed(0)
    flows = GlobalPlanarFlows(latent_dim=2, flows=3).double()
    opt = torch.optim.Adam(flows.parameters(), lr=0.5)
    z = torch.randn(64, 2, dtype=torch.float64)
    for _ in range(50):
        _, log_det = flows(z)
        loss = log_det.mean()  # shrink the Jacobian: drives w^T u towards -infinity
        opt.zero_grad()
        loss.backward()
        opt.step()
    uh, w, _ = flows.params()
    assert ((w * flows.u).sum(-1) < -1).any()  # the raw parameters left the invertible set ...
    assert ((w * uh).sum(-1) >= -1).all()  # ... the constrained ones never do
    assert torch.isfinite(flows(z)[1]).all()


def test_global_flows_equal_explicit_parameters_and_shapes_are_checked():
    torch.manual_seed(0)
    flows = GlobalPlanarFlows(latent_dim=4, flows=3)
    z = torch.randn(6, 2, 4)
    zK, log_det = flows(z)
    ref = planar_flows(z, u_hat(flows.u, flows.w), flows.w, flows.b)
    torch.testing.assert_close(zK, ref[0])
    torch.testing.assert_close(log_det, ref[1])
    z0, ld0 = planar_flows(z, torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0))
    assert torch.equal(z0, z) and torch.equal(ld0, torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"expected z \[\.\.\., 4\], got \(6, 3\)"):
        flows(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="expected u_hat, w"):
        planar_flows(z, torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2))


def _reference_from_raw(z, u, w, b):
    """u_hat then planar_flows with autograd: what fused_planar_flows must equal, values and gradients."""
    return planar_flows(z, u_hat(u, w).unsqueeze(1), w.unsqueeze(1), b.unsqueeze(1))


@pytest.mark.parametrize("N,S,K,d", [(3, 1, 4, 5), (2, 3, 5, 4), (4, 2, 1, 3), (1, 6, 3, 2)])
def test_fused_flows_gradients_match_finite_differences_and_autograd_through_u_hat(N, S, K, d):
    gen = torch.Generator().manual_seed(N * 100 + S * 10 + K)
    z = torch.randn(N, S, d, generator=gen, dtype=torch.float64, requires_grad=True)
    u, w, b = (t.reshape(N, K, -1).squeeze(-1) for t in _params(N * K, d, gen))  # w^T u near -3: u_hat moves u
    u[0] = torch.randn(K, d, generator=gen, dtype=torch.float64) * 2  # and some rows left alone (w^T u > -1)
    u, w, b = (t.detach().requires_grad_() for t in (u, w, b))
    assert torch.autograd.gradcheck(fused_planar_flows, (z, u, w, b))
    fused, ref = fused_planar_flows(z, u, w, b), _reference_from_raw(z, u, w, b)
    for a, c in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    g_out = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    grads = [torch.autograd.grad(sum((o * g).sum() for o, g in zip(out, g_out, strict=True)), (z, u, w, b))
             for out in (fused, ref)]
    for a, c in zip(*grads, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_fused_flows_where_the_margin_clamps_and_in_float32():
    # w^T u = -1e4: softplus underflows, m is clamped (m' = 0); the gradient still equals autograd's
    w = torch.tensor([[[2.0, 0.0, 0.0], [0.5, 1.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[[-5e3, 1.0, 0.0], [0.3, -0.2, 1.0]]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    fused, ref = fused_planar_flows(z, u, w, b), _reference_from_raw(z, u, w, b)
    assert (w[0, 0] * u_hat(u, w)[0, 0]).sum().item() == pytest.approx(-1 + U_HAT_MARGIN, abs=1e-12)
    for a, c in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    grads = [torch.autograd.grad(out[0].sum() + out[1].sum(), (z, u, w, b)) for out in (fused, ref)]
    for a, c in zip(*grads, strict=True):  # terms of size |w^T u| / ||w||^2 ~ 1e3 cancel: atol 1e-7
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-7)
    # float32 at the training shapes: no further from the float64 values than the reference in float32
    gen = torch.Generator().manual_seed(7)
    for scale in (0.3, 1.0):  # 1.0: ||u_hat|| ~ 6, and float32 roundoff grows over the 10 flows
        z, u, w = (torch.randn(s, generator=gen) for s in ((100, 1, 40), (100, 10, 40), (100, 10, 40)))
        u, w, b = u * scale, w * scale, torch.randn(100, 10, generator=gen)
        exact = _reference_from_raw(*(t.double() for t in (z, u, w, b)))
        outs = fused_planar_flows(z, u, w, b), _reference_from_raw(z, u, w, b)
        for a, c, e in zip(*outs, exact, strict=True):
            assert (a.double() - e).abs().max() <= 1.5 * (c.double() - e).abs().max() + 1e-6 * e.abs().max()
            if scale < 1:
                torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    with pytest.raises(ValueError, match=r"expected z \[N, S, d\], u and w \[N, K, d\], b \[N, K\]"):
        fused_planar_flows(torch.zeros(2, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1))
    z0 = torch.randn(2, 1, 3)
    zK, ld = fused_planar_flows(z0, torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), torch.zeros(2, 0))
    assert torch.equal(zK, z0) and torch.equal(ld, torch.zeros(2, 1))
