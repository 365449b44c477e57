"""service/numerics.py without HTTP, against independent references: the planar flow against training's
torch implementation (the same formula written twice, in two libraries), the bounds against a direct
logsumexp, and the prior draws against numpy's generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.numerics import binarize, bounds_from_log_weights, planar_flow, prior_draws
from training.flows import planar_flows, u_hat


@pytest.mark.parametrize("K", [0, 1, 5])
def test_the_numpy_planar_flow_is_the_torch_one(K):
    rng = np.random.default_rng(K)
    N, d = 7, 4
    z = rng.standard_normal((N, d))
    w = rng.standard_normal((N, K, d))
    u = u_hat(torch.from_numpy(rng.standard_normal((N, K, d))), torch.from_numpy(w)).numpy()
    b = rng.standard_normal((N, K))
    want, _ = planar_flows(torch.from_numpy(z), torch.from_numpy(u), torch.from_numpy(w), torch.from_numpy(b))
    got = planar_flow(z, u, w, b)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)
    if K:
        assert not np.allclose(got, z)  # the flows moved the codes


def test_bounds_are_the_mean_and_the_logsumexp_minus_log_s():
    rng = np.random.default_rng(0)
    log_w = rng.normal(-90.0, 3.0, (3, 50)).astype(np.float32)
    elbo, iw = bounds_from_log_weights(log_w)
    for n in range(3):
        row = [float(v) for v in log_w[n]]
        assert elbo[n] == pytest.approx(math.fsum(row) / 50, rel=1e-12)
        top = max(row)
        assert iw[n] == pytest.approx(top + math.log(math.fsum(math.exp(v - top) for v in row)) - math.log(50),
                                      rel=1e-12)
    assert np.all(iw >= elbo)  # Jensen
    same = np.full((1, 8), -5.0)
    assert bounds_from_log_weights(same)[1][0] == pytest.approx(-5.0)  # equal weights: the bound is the weight


def test_a_non_finite_weight_gives_non_finite_figures_without_a_warning():
    with np.errstate(all="raise"):
        elbo, iw = bounds_from_log_weights(np.array([[0.0, -np.inf], [np.nan, 1.0], [1.0, 2.0]]))
    assert not np.isfinite(elbo[:2]).any() and np.isfinite(elbo[2]) and np.isfinite(iw[2])


def test_binarize_and_prior_draws():
    assert binarize(np.array([0.0, 0.49, 0.5, 1.0])).tolist() == [0.0, 0.0, 1.0, 1.0]
    z = prior_draws(3, 4, 2, 0.5)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, (0.5 * np.random.default_rng(3).standard_normal((4, 2))).astype(np.float32))
