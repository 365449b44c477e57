"""PPCA against independent references: the dense Gaussian density, the closed-form ML solution and
scikit-learn's PCA (whose probabilistic model is PPCA with the N - 1 covariance convention).
Stochastic EM has its own tests in test_ppca_sem.py."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from training.data import digits_raw
from training.ppca import (
    PPCA,
    PPCAConfig,
    closed_form,
    em_step,
    init_from_data,
    mean_log_prob,
)


@pytest.fixture(scope="module")
def digits():
    return torch.as_tensor(digits_raw())


def _random_model(D=12, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = PPCA(PPCAConfig(D, d))
    return model.set_parameters(torch.randn(D, generator=g, dtype=torch.float64),
                                torch.randn(D, d, generator=g, dtype=torch.float64), 0.3)


def test_log_prob_matches_dense_gaussian():
    model = _random_model()
    x = torch.randn(20, 12, dtype=torch.float64)
    C = model.W @ model.W.T + model.sigma2 * torch.eye(12, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(model.mu, covariance_matrix=C).log_prob(x)
    assert torch.allclose(model.log_prob(x), ref.detach(), atol=1e-10)


def test_posterior_matches_gaussian_conditioning():
    model = _random_model()
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        mean, cov = model.posterior(x)
        # Joint of (z, x): Cov(z, x) = W^T, Cov(x) = C; condition the Gaussian on x.
        C = model.W @ model.W.T + model.sigma2 * torch.eye(12, dtype=torch.float64)
        K = model.W.T @ torch.linalg.inv(C)
        assert torch.allclose(mean, (x - model.mu) @ K.T, atol=1e-10)
        assert torch.allclose(cov, torch.eye(3, dtype=torch.float64) - K @ model.W, atol=1e-10)


def test_closed_form_is_stationary_and_matches_sklearn(digits):
    mu, W, sigma2 = closed_form(digits, 10)
    model = PPCA(PPCAConfig(64, 10)).set_parameters(mu, W, sigma2)
    ll = mean_log_prob(model, digits)
    # scikit-learn divides the covariance by N - 1; the ML solution by N: a tiny difference in nats.
    sk = PCA(n_components=10, svd_solver="full").fit(digits.numpy())
    assert abs(ll - sk.score(digits.numpy())) < 1e-2
    assert abs(float(sigma2) * len(digits) / (len(digits) - 1) - sk.noise_variance_) < 1e-10
    # An EM step from the optimum stays at the optimum.
    em_step(model, digits)
    assert abs(mean_log_prob(model, digits) - ll) < 1e-9


def test_em_reaches_closed_form_optimum(digits):
    model = PPCA(PPCAConfig(64, 10))
    best = mean_log_prob(PPCA(PPCAConfig(64, 10)).set_parameters(*closed_form(digits, 10)), digits)
    init_from_data(model, digits, torch.Generator().manual_seed(0))
    prev = -np.inf
    for _ in range(2000):
        em_step(model, digits, chunk_size=500)  # chunked sums: the data need not fit in one batch
        ll = mean_log_prob(model, digits)
        assert ll >= prev - 1e-9, "EM must never decrease the log-likelihood"
        if ll - prev < 1e-8:
            break
        prev = ll
    assert best - ll < 1e-4


def test_em_chunking_does_not_change_the_step(digits):
    a = init_from_data(PPCA(PPCAConfig(64, 5)), digits, torch.Generator().manual_seed(1))
    b = PPCA(PPCAConfig(64, 5))
    b.load_state_dict(a.state_dict())
    em_step(a, digits, chunk_size=10_000)
    em_step(b, digits, chunk_size=97)
    assert torch.allclose(a.W, b.W, atol=1e-12) and torch.allclose(a.sigma2, b.sigma2, atol=1e-14)


def test_sample_covariance_matches_model():
    model = _random_model(D=6, d=2)
    x, _ = model.sample(200_000, torch.Generator().manual_seed(0))
    C = (model.W @ model.W.T + model.sigma2 * torch.eye(6, dtype=torch.float64)).detach()
    assert torch.allclose(torch.cov(x.T), C, atol=0.05 * C.abs().max())


def test_input_validation():
    model = _random_model()
    with pytest.raises(ValueError, match=r"expected x of shape \[N, 12\], got \[3, 5\]"):
        model.log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="latent_dim"):
        PPCA(PPCAConfig(4, 4))
