"""Stochastic EM (training.ppca_sem) against independent references: finite differences of the
complete-data log-density written with torch.distributions, and the closed-form ML solution."""

import math

import pytest
import torch
from torch.distributions import Normal

from training.data import digits_raw
from training.ppca import PPCA, PPCAConfig, closed_form, init_from_data, mean_log_prob
from training.ppca_sem import DivergenceError, SEMSettings, StochasticEM, sample_posterior

GAP = 0.5  # nats/image from the closed-form optimum


@pytest.fixture(autouse=True)
def one_thread():
    # A one-row step is a few tiny matrix products: more threads only add overhead, and on a busy
    # 2-core machine these tests took 30-70 s instead of 1-3 s with torch's default two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    x = torch.as_tensor(digits_raw())
    best = mean_log_prob(PPCA(PPCAConfig(64, 10)).set_parameters(*closed_form(x, 10)), x)
    return x, best


def _random_model(D=6, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = PPCA(PPCAConfig(D, d))
    return model.set_parameters(torch.randn(D, generator=g, dtype=torch.float64),
                                torch.randn(D, d, generator=g, dtype=torch.float64), 0.7)


def _log_joint_reference(x, z, mu, W, log_sigma2):
    """mean_j log p(x_j, z_j | theta) from torch.distributions, not from the code under test."""
    px = Normal(mu + z @ W.T, (0.5 * log_sigma2).exp()).log_prob(x).sum(1)
    pz = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(1)
    return float((px + pz).mean())


def _finite_difference_gradient(f, theta, h=1e-6):
    grad = torch.zeros_like(theta)
    for i in range(len(theta)):
        e = torch.zeros_like(theta)
        e[i] = h
        grad[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("step", ["plain", "natural"])
def test_step_is_kappa_times_the_finite_difference_gradient(step):
    """plain: theta~_{t+1} - theta~_t = kappa grad_theta~ log p(x, z | theta) in theta~ = (mu/c, W/c, sqrt(D/2) s);
    natural: the same gradient in theta = (mu, W, s), times the inverse Fisher blocks (sigma2, sigma2, 2/D)."""
    D, d, B = 6, 2, 3
    model = _random_model(D, d)
    x = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2.0 + 1.0
    xb = x[:B]
    kappa0 = 1e-3
    sem = StochasticEM(model, x, SEMSettings(step=step, batch_size=B, kappa0=kappa0),
                       torch.Generator().manual_seed(7))
    mu0, W0, s0 = (p.detach().clone() for p in (model.mu, model.W, model.log_sigma2))
    # The z the step draws: the same E'-step from the same generator state.
    M = W0.T @ W0 + s0.exp() * torch.eye(d, dtype=torch.float64)
    z = sample_posterior(xb - mu0, W0, s0.exp(), torch.linalg.cholesky(M), torch.Generator().manual_seed(7))
    kappa = sem.step(xb)
    assert kappa == kappa0  # the hand-tuned schedule at t = 0
    delta = torch.cat([(model.mu - mu0).detach(), (model.W - W0).detach().reshape(-1),
                       (model.log_sigma2 - s0).detach().reshape(1)])

    def unpack(theta):
        return theta[:D], theta[D : D + D * d].reshape(D, d), theta[-1]

    if step == "plain":
        c = math.sqrt(float((x - x.mean(0)).pow(2).mean()))
        scale = torch.cat([torch.full((D + D * d,), c, dtype=torch.float64),
                           torch.tensor([math.sqrt(2.0 / D)], dtype=torch.float64)])

        def f(theta_tilde):
            return _log_joint_reference(xb, z, *unpack(theta_tilde * scale))

        theta_tilde = torch.cat([mu0, W0.reshape(-1), s0.reshape(1)]) / scale
        expected = kappa * _finite_difference_gradient(f, theta_tilde) * scale  # back in theta's coordinates
    else:
        def f(theta):
            return _log_joint_reference(xb, z, *unpack(theta))

        theta = torch.cat([mu0, W0.reshape(-1), s0.reshape(1)])
        fisher_inv = torch.cat([torch.full((D + D * d,), float(s0.exp()), dtype=torch.float64),
                                torch.tensor([2.0 / D], dtype=torch.float64)])
        expected = kappa * fisher_inv * _finite_difference_gradient(f, theta)
    assert torch.allclose(delta, expected, rtol=1e-6, atol=1e-9)


def _epochs_to_gap(x, best, settings, max_epochs, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = init_from_data(PPCA(PPCAConfig(x.shape[1], 10)), x, g)
    sem = StochasticEM(model, x, settings, g)
    for epoch in range(1, max_epochs + 1):
        sem.advance(len(x))
        gap = best - mean_log_prob(model, x)
        if gap < GAP:
            return epoch, gap
    return None, gap


@pytest.mark.parametrize("step, sampling, max_epochs", [
    ("natural", "epochs", 4),
    ("natural", "with-replacement", 5),
    ("plain", "epochs", 10),
])
def test_batch_one_gets_within_half_a_nat_of_the_optimum(digits, step, sampling, max_epochs):
    x, best = digits
    epochs, gap = _epochs_to_gap(x, best, SEMSettings(step=step, sampling=sampling, batch_size=1), max_epochs)
    assert epochs is not None, f"{step}/{sampling}: still {gap:.3f} nats/image from the optimum after {max_epochs}"


@pytest.mark.parametrize("batch_size, max_epochs", [(10, 4), (100, 4), (1797, 20)])
def test_default_step_size_converges_for_any_batch_size(digits, batch_size, max_epochs):
    x, best = digits
    epochs, gap = _epochs_to_gap(x, best, SEMSettings(batch_size=batch_size), max_epochs)
    assert epochs is not None, f"batch {batch_size}: still {gap:.3f} nats/image from the optimum after {max_epochs}"


def test_huge_kappa0_is_reported_and_the_last_good_parameters_kept(digits):
    x, _ = digits
    g = torch.Generator().manual_seed(0)
    model = init_from_data(PPCA(PPCAConfig(64, 10)), x, g)
    sem = StochasticEM(model, x, SEMSettings(step="plain", batch_size=1, kappa0=1e6, sampling="with-replacement"), g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DivergenceError) as info:
        sem.advance(len(x))
    message = str(info.value)
    assert "diverged at step 1 " in message and "sigma2 became" in message
    assert "kappa = 1e+06" in message and "--kappa0 auto" in message
    assert info.value.step == 1 and info.value.kappa == 1e6
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the step was rejected"


def test_divergence_after_good_steps_keeps_the_last_good_step(digits):
    x, _ = digits
    g = torch.Generator().manual_seed(0)
    model = init_from_data(PPCA(PPCAConfig(64, 10)), x, g)
    # About 50 times a typical one-row stability limit 1/(d + 1): a few dozen steps stay valid, then one
    # breaks (here, on this data and seed, M stops being positive definite after step 51).
    sem = StochasticEM(model, x, SEMSettings(batch_size=1, kappa0=5.0, t0=1e9), g)
    good = None
    with pytest.raises(DivergenceError) as info:
        for i in range(len(x)):
            good = {k: v.clone() for k, v in model.state_dict().items()}
            sem.step(x[i : i + 1])
    assert info.value.step == sem.steps + 1 > 1
    assert any(reason in str(info.value) for reason in ("sigma2 became", "non-finite", "not positive definite after"))
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_loss_of_positive_definiteness_is_reported_not_a_cholesky_traceback():
    # With sigma2 > 0, M is positive definite in exact arithmetic: only rounding (sigma2 far below W^T W on a
    # rank-deficient W) breaks it. The check after a step is the same function.
    model = _random_model(D=6, d=2)
    W = torch.ones(6, 2, dtype=torch.float64) * 1e10  # two equal columns: W^T W is singular
    model.set_parameters(torch.zeros(6, dtype=torch.float64), W, 1e-300)
    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sem = StochasticEM(model, x, SEMSettings(batch_size=1))
    with pytest.raises(DivergenceError, match="not positive definite at the parameters it starts from") as info:
        sem.step(x[:1])
    assert "What to try: start from the data's mean and variance" in str(info.value)


def test_settings_are_validated():
    model = _random_model()
    x = torch.randn(5, 6, dtype=torch.float64)
    for settings, match in [(SEMSettings(batch_size=0), r"batch size must be in \[1, 5\]"),
                            (SEMSettings(batch_size=6), r"batch size must be in \[1, 5\]"),
                            (SEMSettings(batch_size=1, power=0.5), r"\(0.5, 1\]"),
                            (SEMSettings(batch_size=1, kappa0=-1.0), "kappa0 must be a positive number"),
                            (SEMSettings(batch_size=1, step="newton"), "unknown step"),
                            (SEMSettings(batch_size=1, sampling="stratified"), "unknown sampling")]:
        with pytest.raises(ValueError, match=match):
            StochasticEM(model, x, settings)
