"""Probabilistic PCA (Tipping & Bishop 1999): the linear Gaussian latent model

    p(z) = N(0, I_d),    p(x | z) = N(x; mu + W z, sigma2 I_D),    so    p(x) = N(x; mu, C),  C = W W^T + sigma2 I.

Three ways to fit it, sharing one model class:

* :func:`closed_form` -- the maximum-likelihood solution from the eigendecomposition of the sample
  covariance (the reference every other fit is checked against);
* :func:`em_step` -- exact EM with the posterior moments under M = W^T W + sigma2 I, O(N D d) per
  iteration, accumulated over chunks so the data need not fit in one batch and never forming the
  D x D covariance;
* stochastic EM (:mod:`training.ppca_sem`) -- draw a minibatch, down to one row, sample z_hat from its
  exact posterior p(z | x, theta), and take a Robbins-Monro step along the (plain or natural) gradient
  of log p(x, z_hat | theta).

Everything is in float64 and in nats, with every constant of the Gaussian densities kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)
# Sums over the ranks of a distributed fit (training.distributed.Dist.sum): tensors in, their float64 sums
# over all ranks out, in one collective. None: the rows given are all the rows.
Reduce = Callable[..., tuple[Tensor, ...]]


@dataclass
class PPCAConfig:
    data_dim: int  # D: pixels per image
    latent_dim: int  # d: number of principal directions kept; must be < D


class PPCA(nn.Module):
    """The model: parameters ``mu`` [D], ``W`` [D, d] and ``sigma2`` (a positive scalar).

    Public methods validate their input and return per-sample ``[N]`` or ``[N, ...]`` tensors.
    """

    def __init__(self, config: PPCAConfig):
        super().__init__()
        if not 1 <= config.latent_dim < config.data_dim:
            raise ValueError(f"latent_dim must be in [1, data_dim) = [1, {config.data_dim}), got {config.latent_dim}")
        self.config = config
        D, d = config.data_dim, config.latent_dim
        self.mu = nn.Parameter(torch.zeros(D, dtype=torch.float64))
        self.W = nn.Parameter(torch.zeros(D, d, dtype=torch.float64))
        # sigma2 is stored through its log so that gradient steps keep it positive.
        self.log_sigma2 = nn.Parameter(torch.zeros((), dtype=torch.float64))

    # -- parameters --------------------------------------------------------------------------
    @property
    def sigma2(self) -> Tensor:
        return self.log_sigma2.exp()

    @torch.no_grad()
    def set_parameters(self, mu: Tensor, W: Tensor, sigma2: float | Tensor) -> PPCA:
        D, d = self.config.data_dim, self.config.latent_dim
        if tuple(mu.shape) != (D,) or tuple(W.shape) != (D, d):
            raise ValueError(f"expected mu [{D}] and W [{D}, {d}], got {list(mu.shape)} and {list(W.shape)}")
        sigma2 = torch.as_tensor(sigma2, dtype=torch.float64)
        if not sigma2 > 0:
            raise ValueError(f"sigma2 must be positive, got {float(sigma2)}")
        self.mu.copy_(mu)
        self.W.copy_(W)
        self.log_sigma2.copy_(sigma2.log())
        return self

    def M(self) -> Tensor:
        """M = W^T W + sigma2 I_d, the d x d matrix behind the posterior and the Woodbury identity."""
        d = self.config.latent_dim
        return self.W.T @ self.W + self.sigma2 * torch.eye(d, dtype=self.W.dtype, device=self.W.device)

    # -- inference ---------------------------------------------------------------------------
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Exact posterior p(z | x) = N(M^-1 W^T (x - mu), sigma2 M^-1): mean [N, d] and covariance [d, d]."""
        x = self._check_x(x)
        M_chol = torch.linalg.cholesky(self.M())
        # cholesky_solve solves M a = b for columns b: all rows at once with b = W^T (x - mu)^T.
        mean = torch.cholesky_solve(self.W.T @ (x - self.mu).T, M_chol).T
        cov = self.sigma2 * torch.cholesky_inverse(M_chol)
        return mean, cov

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) [N] in nats through the Woodbury identity and the matrix determinant lemma, O(N D d).

        log|C| = (D - d) log sigma2 + log|M|;  x_c^T C^-1 x_c = (|x_c|^2 - |L^-1 W^T x_c|^2) / sigma2, M = L L^T.
        """
        x = self._check_x(x)
        D, d = self.config.data_dim, self.config.latent_dim
        sigma2 = self.sigma2
        L = torch.linalg.cholesky(self.M())
        xc = x - self.mu
        proj = torch.linalg.solve_triangular(L, self.W.T @ xc.T, upper=False)  # [d, N]
        quad = (xc.pow(2).sum(1) - proj.pow(2).sum(0)) / sigma2
        log_det_C = (D - d) * sigma2.log() + 2.0 * L.diagonal().log().sum()
        return -0.5 * (D * LOG_2PI + log_det_C + quad)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws (x [n, D], z [n, d]) from the model."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        D, d = self.config.data_dim, self.config.latent_dim
        kw = {"dtype": self.W.dtype, "device": self.W.device, "generator": generator}
        z = torch.randn(n, d, **kw)
        x = self.mu + z @ self.W.T + self.sigma2.sqrt() * torch.randn(n, D, **kw)
        return x, z

    def _check_x(self, x: Tensor) -> Tensor:
        D = self.config.data_dim
        if x.ndim != 2 or x.shape[1] != D:
            raise ValueError(f"expected x of shape [N, {D}], got {list(x.shape)}")
        return x.to(self.W.dtype)


# ------------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------------


def closed_form(x: Tensor, latent_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The maximum-likelihood (mu, W, sigma2) of Tipping & Bishop (1999), eqs. (7)-(8).

    With S = (1/N) sum (x - mu)(x - mu)^T (the ML covariance, divided by N) and its eigenvalues
    lambda_1 >= ... >= lambda_D: sigma2 = (1 / (D - d)) sum_{j > d} lambda_j and
    W = U_d (Lambda_d - sigma2 I)^{1/2} (taking the rotation R = I). The eigenpairs come from the
    thin SVD of the centred data, so S itself is never formed.
    """
    N, D = x.shape
    if not 1 <= latent_dim < D:
        raise ValueError(f"latent_dim must be in [1, {D}), got {latent_dim}")
    if N < 2:
        raise ValueError(f"need at least 2 rows to fit, got {N}")
    x = x.to(torch.float64)
    mu = x.mean(0)
    xc = x - mu
    _, s, Vh = torch.linalg.svd(xc, full_matrices=False)
    lam = s.pow(2) / N
    total = xc.pow(2).sum() / N  # trace(S): the sum of all D eigenvalues, also those beyond rank N
    sigma2 = (total - lam[:latent_dim].sum()) / (D - latent_dim)
    if not sigma2 > 0:
        raise ValueError(f"the {N} training rows lie in a subspace of dimension <= latent_dim = {latent_dim}: "
                         f"sigma2 would be 0 (N rows span at most N - 1 = {N - 1} dimensions); use a latent_dim "
                         "below the rank of the centred data, or more rows")
    W = Vh[:latent_dim].T * (lam[:latent_dim] - sigma2).clamp_min(0.0).sqrt()
    return mu, W, sigma2


def closed_form_from_sums(x: Tensor, latent_dim: int, reduce: Reduce) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`closed_form` for rows spread over ranks, from float64 sums: N and sum x, then the centred
    scatter sum (x - mu)(x - mu)^T (D x D), each all-reduced once; S = scatter / N is eigendecomposed.

    The scatter is taken about the global mean (a second all-reduce) rather than as sum x x^T - N mu mu^T,
    whose difference of two large terms loses digits when the mean is large against the spread.
    """
    D = x.shape[1]
    if not 1 <= latent_dim < D:
        raise ValueError(f"latent_dim must be in [1, {D}), got {latent_dim}")
    x = x.to(torch.float64)
    n, s1 = reduce(float(len(x)), x.sum(0))
    if not n >= 2:
        raise ValueError(f"need at least 2 rows to fit, got {int(n)}")
    mu = s1 / n
    xc = x - mu
    (scatter,) = reduce(xc.T @ xc)
    lam, U = torch.linalg.eigh(scatter / n)  # ascending
    lam, U = lam.flip(0), U.flip(1)
    sigma2 = (lam.sum() - lam[:latent_dim].sum()) / (D - latent_dim)
    if not sigma2 > 0:
        raise ValueError(f"the {int(n)} training rows lie in a subspace of dimension <= latent_dim = {latent_dim}: "
                         "sigma2 would be 0; use a latent_dim below the rank of the centred data, or more rows")
    W = U[:, :latent_dim] * (lam[:latent_dim] - sigma2).clamp_min(0.0).sqrt()
    return mu, W, sigma2


def chunks(x: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, len(x), size):
        yield x[start : start + size]


@torch.no_grad()
def em_step(model: PPCA, x: Tensor, chunk_size: int = 4096, reduce: Reduce | None = None) -> None:
    """One exact EM iteration (Tipping & Bishop 1999, eqs. 27-28 written over the data, not S).

    E-step, per row: E[z] = M^-1 W^T (x - mu),  E[z z^T] = sigma2 M^-1 + E[z] E[z]^T.
    M-step:  W' = (sum x_c E[z]^T) (sum E[z z^T])^-1,
             sigma2' = (sum |x_c|^2 - 2 sum E[z]^T W'^T x_c + tr(sum E[z z^T] W'^T W')) / (N D).
    mu is its ML value, the data mean, throughout. Sums run over chunks: O(N D d) time, O(chunk D) memory.
    With `reduce`, x is one rank's rows and the four sums (and N) are all-reduced in one collective, so
    every rank takes the same M-step.
    """
    N, D = x.shape
    d = model.config.latent_dim
    mu, W = model.mu, model.W
    L = torch.linalg.cholesky(model.M())
    M_inv = torch.cholesky_inverse(L)
    sum_xc_Ez = torch.zeros(D, d, dtype=W.dtype, device=W.device)
    sum_Ez_Ez = torch.zeros(d, d, dtype=W.dtype, device=W.device)
    sum_sq = torch.zeros((), dtype=W.dtype, device=W.device)
    for xb in chunks(x, chunk_size):
        xc = xb.to(W.dtype) - mu
        Ez = xc @ W @ M_inv  # M is symmetric, so (M^-1 W^T x_c)^T = x_c^T W M^-1
        sum_xc_Ez += xc.T @ Ez
        sum_Ez_Ez += Ez.T @ Ez
        sum_sq += xc.pow(2).sum()
    if reduce is not None:
        sum_xc_Ez, sum_Ez_Ez, sum_sq, N = reduce(sum_xc_Ez, sum_Ez_Ez, sum_sq, float(N))
    sum_Ezz = N * model.sigma2 * M_inv + sum_Ez_Ez
    W_new = torch.linalg.solve(sum_Ezz, sum_xc_Ez.T).T  # sum_Ezz is symmetric
    sigma2_new = (sum_sq - 2.0 * (sum_xc_Ez * W_new).sum() + (sum_Ezz * (W_new.T @ W_new)).sum()) / (N * D)
    model.set_parameters(mu, W_new, sigma2_new)


@torch.no_grad()
def init_from_data(model: PPCA, x: Tensor, generator: torch.Generator | None = None,
                   reduce: Reduce | None = None) -> PPCA:
    """A neutral start: mu = the rows' mean, W small random, sigma2 = the mean pixel variance.

    With `reduce`, over all ranks' rows; W is the same on every rank when their generators are seeded alike.
    """
    x = model._check_x(x)
    D, d = model.config.data_dim, model.config.latent_dim
    if reduce is None:
        mu = x.mean(0)
        var = (x - mu).pow(2).mean().clamp_min(1e-12)
    else:
        n, s1 = reduce(float(len(x)), x.sum(0))
        mu = s1 / n
        var = (reduce((x - mu).pow(2).sum())[0] / (n * D)).clamp_min(1e-12)
    W = torch.randn(D, d, dtype=x.dtype, device=x.device, generator=generator) * (0.1 * var.sqrt())
    return model.set_parameters(mu, W, var)


@torch.no_grad()
def mean_log_prob(model: PPCA, x: Tensor, chunk_size: int = 4096, reduce: Reduce | None = None) -> float:
    """Mean exact log p(x) over the rows of x (with `reduce`: of all ranks), in nats per image, in chunks."""
    total = sum(float(model.log_prob(xb.to(model.W.device)).sum()) for xb in chunks(x, chunk_size))
    if reduce is None:
        return total / len(x)
    total, n = reduce(total, float(len(x)))
    return float(total / n)
