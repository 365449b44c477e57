"""Stochastic EM for PPCA: one E'-step and one gradient M'-step per minibatch, down to one data point.

The model is :class:`training.ppca.PPCA`, x = mu + W z + noise with z ~ N(0, I_d) and noise ~ N(0, sigma2 I_D),
and the parameters are theta = (mu, W, s) with s = log sigma2 (so that every step keeps sigma2 > 0).

Step t takes a batch B_t of B row indices (drawn uniformly with replacement, or the next B rows of a
shuffled pass; see :data:`SAMPLINGS`) and does:

E'-step, for each j in B_t:   z_j ~ p(z | x_j, theta_t) = N(M^-1 W^T (x_j - mu), sigma2 M^-1),  M = W^T W + sigma2 I_d.

M'-step:   theta_{t+1} = theta_t + kappa_t P g_t,   g_t = (1/B) sum_j grad_theta log p(x_j, z_j | theta_t),

with the complete-data log-likelihood and its gradient, for r_j = x_j - mu - W z_j,

    log p(x, z | theta) = -D/2 (log 2 pi + s) - |r|^2 / (2 sigma2) - d/2 log 2 pi - |z|^2 / 2,
    grad_mu = r / sigma2,   grad_W = r z^T / sigma2,   d/ds = |r|^2 / (2 sigma2) - D/2,

and the preconditioner P of the chosen step (:data:`STEPS`):

* ``plain`` -- the seed's raw gradient, P = I, taken in the fixed coordinates
  theta~ = (mu / c, W / c, sqrt(D/2) s), c^2 the data's mean pixel variance (the starting sigma2). In the
  original coordinates:  mu += kappa c^2 grad_mu,  W += kappa c^2 grad_W,  s += kappa (2/D) d/ds.
  The coordinates make the step independent of the data's units (scaling x by a scales mu, W and c
  alike) and give the complete-data Fisher information I at the start; the step does not follow the
  Fisher information as sigma2 shrinks, so it is the plain step of a fixed parameterisation.
* ``natural`` -- the natural gradient: P is the inverse Fisher information of p(x | z, theta) in each block
  (sigma2 for mu and W, 2/D for s):  mu += kappa sigma2_t grad_mu = kappa mean(r),
  W += kappa mean(r z^T),  s += kappa (2/D) d/ds. It is the plain step with c^2 replaced by the current sigma2.

Step size (``kappa0=None``, the default): kappa_t = min(1 / L_t, B eta(n_t)), with n_t the points seen
before step t, N the rows, and

    eta(n) = rho0 / (d + 1) * (1 + n / N)^-power,      rho0 = 0.1, power = 1.

* 1 / L_t is the stability limit. L_t is the largest curvature of the batch's objective
  -(1/B) sum_j log p(x_j, z_j | theta) in the step's metric, taken block by block:
  (mu, W): lambda_max(S_u) q / sigma2 with S_u = (1/B) sum_j u_j u_j^T, u_j = (1, z_j), q = c^2 (plain) or
  sigma2 (natural); s: (1/B) sum_j |r_j|^2 / (D sigma2). A gradient step on a quadratic of curvature L
  converges for kappa < 2 / L; kappa = 1 / L does not overshoot along the stiffest direction of the
  sampled objective. For B = 1 and (mu, W) it is normalised LMS with a unit step (a least-squares
  regression of x on u). This is what makes batch size 1 work from the first step: with a fixed
  kappa the single-point curvature |u|^2 / sigma2 is d + 1 times that of a large batch.
* B eta(n) is a rate per data point: one step on the mean gradient of B points moves theta as far as B
  single-point steps would when steps are small, so the curves against points seen agree across
  batch sizes until the cap binds. At the ML solution E[z z^T] = I, so E|u|^2 = d + 1 and the
  single-point limit is about 1/(d+1) in the natural metric: rho0 = 0.1 is a tenth of it. Larger
  rates leave more noise in theta, smaller ones forget the start slowly; 0.1 ended closest to the optimum
  of the rates tried (docs/benchmarks.md, "PPCA stochastic EM"). The decay is per epoch of N points,
  whatever B.
* Robbins-Monro: once eta binds, kappa_t = B rho0/(d+1) (1 + t B / N)^-power with 0.5 < power <= 1, so
  sum kappa_t = inf and sum kappa_t^2 < inf; L_t stays bounded while sigma2 stays away from 0 and
  infinity, so the cap never stops the sum from diverging.

A number ``kappa0`` instead gives the seed's hand-tuned schedule kappa_t = kappa0 (1 + t/t0)^-power with
no stability cap (t counts steps).

Divergence: every step checks the new parameters (mu and W finite, sigma2 finite and positive,
M = W^T W + sigma2 I positive definite) before it replaces the old ones; if a check fails it raises
:class:`DivergenceError` (the step, kappa, the reason and what to try) and the model keeps theta_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from training.distributed import Dist
from training.ppca import PPCA

STEPS = ("natural", "plain")
SAMPLINGS = ("with-replacement", "epochs")


class DivergenceError(ValueError):
    """A stochastic-EM step produced invalid parameters; the model still holds the last good ones.

    A ValueError because a setting (the step size) did not suit the data: the command line reports it
    as an error with its message, not a traceback.
    """

    def __init__(self, message: str, *, step: int, kappa: float):
        super().__init__(message)
        self.step = step
        self.kappa = kappa


@dataclass
class SEMSettings:
    step: str = "natural"
    sampling: str = "epochs"
    batch_size: int = 100
    kappa0: float | None = None  # None: the automatic rule min(1 / L_t, B eta(n_t))
    rho0: float = 0.1  # automatic rule: per-point rate as a fraction of the single-point stability limit
    power: float = 1.0  # decay exponent, in (0.5, 1]
    t0: float = 500.0  # hand-tuned schedule (kappa0 given): steps before kappa_t starts to decay

    def validate(self, n_rows: int) -> None:
        if self.step not in STEPS:
            raise ValueError(f"unknown step {self.step!r}: expected one of {', '.join(STEPS)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}: expected one of {', '.join(SAMPLINGS)}")
        if not 1 <= self.batch_size <= n_rows:
            raise ValueError(f"batch size must be in [1, {n_rows}] (the training rows), got {self.batch_size}")
        if not 0.5 < self.power <= 1.0:
            raise ValueError(f"power must be in (0.5, 1] for a Robbins-Monro sequence, got {self.power}")
        if self.kappa0 is not None and not (math.isfinite(self.kappa0) and self.kappa0 > 0):
            raise ValueError(f"kappa0 must be a positive number (or 'auto'), got {self.kappa0}")
        if not (math.isfinite(self.rho0) and self.rho0 > 0):
            raise ValueError(f"rho0 must be positive, got {self.rho0}")
        if not self.t0 > 0:
            raise ValueError(f"t0 must be positive, got {self.t0}")


def sample_posterior(xc: Tensor, W: Tensor, sigma2: Tensor, chol: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """The E'-step: one z_j ~ N(M^-1 W^T x_c_j, sigma2 M^-1) per centred row x_c_j, given M's Cholesky factor L.

    The mean is M^-1 W^T x_c; the covariance sigma2 M^-1 = sigma2 L^-T L^-1 is that of sigma L^-T eps, eps ~ N(0, I).
    """
    mean = torch.cholesky_solve((xc @ W).T, chol).T  # [B, d]
    eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
    return mean + sigma2.sqrt() * torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T


class StochasticEM:
    """Runs the steps of the module docstring on ``model`` over the rows ``x`` [N, D].

    ``points_seen`` and ``steps`` count from the start; :meth:`advance` runs whole steps until at least
    a given number of further points has been seen; ``last_kappa`` is the step size of the last step.
    The object owns the model's parameters while it runs: it keeps the Cholesky factor of M from each
    step's check for the next E'-step (computing W^T W is most of a one-row step's cost).

    Across ranks (``dist`` of a torchrun fit): ``x`` is this rank's rows, each rank draws its share of every
    batch from them with its own generator, and the batch's sums (of r, r z^T, |r|^2, u u^T and the rows)
    are all-reduced, so every rank takes the step of the whole batch: the same kappa, the same parameters.
    N (the rows of all ranks) sets the epochs of the step-size decay.
    """

    def __init__(self, model: PPCA, x: Tensor, settings: SEMSettings, generator: torch.Generator | None = None,
                 dist: Dist | None = None):
        self.x = model._check_x(x)
        self.dist = dist = dist or Dist()
        if dist.enabled:
            n, empty = dist.sum(float(len(self.x)), float(len(self.x) == 0))
            if empty > 0 or settings.batch_size < dist.world_size:
                raise ValueError(f"stochastic EM on {dist.world_size} ranks needs at least one row per rank and a "
                                 f"batch size of at least {dist.world_size}; got {int(empty)} ranks without rows "
                                 f"and batch size {settings.batch_size}")
            self.n_total = int(n)
        else:
            self.n_total = len(self.x)
        settings.validate(self.n_total)
        self.model, self.settings, self.generator = model, settings, generator
        # This rank's rows of each batch: the batch size split as evenly as it goes.
        self.local_batch = settings.batch_size // dist.world_size + (dist.rank < settings.batch_size % dist.world_size)
        # c^2 of the plain step's coordinates: the mean pixel variance, fixed for the whole fit.
        if dist.enabled:
            mean = dist.sum(self.x.sum(0))[0] / self.n_total
            self.c2 = float(dist.sum((self.x - mean).pow(2).sum())[0] / (self.n_total * self.x.shape[1]))
        else:
            self.c2 = float((self.x - self.x.mean(0)).pow(2).mean())
        if not self.c2 > 0:
            raise ValueError("the training rows are all equal: there is no variance to model")
        self.steps = 0
        self.points_seen = 0
        self.last_kappa = float("nan")
        self._order = torch.empty(0, dtype=torch.long, device=self.x.device)
        self._pos = 0
        self._chol: Tensor | None = None  # of M at the model's current parameters

    # -- step size ----------------------------------------------------------------------------
    def kappa(self, curvature: float, batch: int) -> float:
        s = self.settings
        if s.kappa0 is not None:
            return s.kappa0 / (1.0 + self.steps / s.t0) ** s.power
        d = self.model.config.latent_dim
        eta = s.rho0 / (d + 1) / (1.0 + self.points_seen / self.n_total) ** s.power
        return min(1.0 / curvature, batch * eta)

    # -- sampling -----------------------------------------------------------------------------
    def _next_batch(self) -> Tensor:
        B, N = self.local_batch, len(self.x)
        if self.settings.sampling == "with-replacement":
            idx = torch.randint(N, (B,), device=self.x.device, generator=self.generator)
        else:  # shuffled passes; the last batch of a pass is shorter when B does not divide N
            if self._pos >= len(self._order):
                self._order = torch.randperm(N, device=self.x.device, generator=self.generator)
                self._pos = 0
            idx = self._order[self._pos : self._pos + B]
            self._pos += len(idx)
        return self.x[idx]

    def advance(self, points: int) -> None:
        """Steps until at least ``points`` more points have been seen (raises :class:`DivergenceError`)."""
        target = self.points_seen + points
        while self.points_seen < target:
            self.step(self._next_batch())

    # -- one step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, xb: Tensor) -> float:
        """One E'-step and M'-step on the rows ``xb``; returns kappa_t. The model changes only if the step is valid."""
        model, D = self.model, self.model.config.data_dim
        mu, W, s = model.mu.detach(), model.W.detach(), model.log_sigma2.detach()
        s2 = s.exp()
        chol = self._chol if self._chol is not None else self._chol_or_raise(W, s2, None)
        B = len(xb)
        xc = xb - mu
        z = sample_posterior(xc, W, s2, chol, self.generator)
        r = xc - z @ W.T
        sum_r, sum_rz, sum_r2 = r.sum(0), r.T @ z, r.pow(2).sum()
        u = torch.cat([torch.ones(B, 1, dtype=z.dtype, device=z.device), z], 1)
        if self.dist.enabled:  # the whole batch's sums, from every rank's share
            sum_r, sum_rz, sum_r2, gram, n = self.dist.sum(sum_r, sum_rz, sum_r2, u.T @ u, float(B))
            B = int(n)
        else:  # lambda_max(u^T u / B) through the smaller of the two Gram matrices: B x B for small batches
            gram = u @ u.T if u.shape[1] >= B else u.T @ u
        g_mu = sum_r / (B * s2)
        g_W = sum_rz / (B * s2)
        g_s = sum_r2 / (2.0 * s2 * B) - D / 2.0

        q = self.c2 if self.settings.step == "plain" else float(s2)
        lam_u = float(torch.linalg.eigvalsh(gram / B)[-1])
        curvature = max(lam_u * q / float(s2), float(sum_r2 / (B * D * s2)))
        kappa = self.kappa(curvature, B)

        mu_new = mu + (kappa * q) * g_mu
        W_new = W + (kappa * q) * g_W
        s_new = s + (kappa * 2.0 / D) * g_s
        self._chol = self._check(mu_new, W_new, s_new, kappa, curvature)
        model.mu.copy_(mu_new)
        model.W.copy_(W_new)
        model.log_sigma2.copy_(s_new)
        self.steps += 1
        self.points_seen += B
        self.last_kappa = kappa
        return kappa

    # -- divergence ---------------------------------------------------------------------------
    def _check(self, mu: Tensor, W: Tensor, s: Tensor, kappa: float, curvature: float) -> Tensor:
        """Raises :class:`DivergenceError` unless the new parameters are valid; returns the Cholesky factor of M."""
        sigma2 = float(s.exp())
        if not (math.isfinite(sigma2) and sigma2 > 0):
            self._raise(f"sigma2 became {sigma2!r} (log sigma2 = {float(s)!r})", kappa, curvature)
        if not bool(torch.isfinite(mu).all() and torch.isfinite(W).all()):
            self._raise("mu or W has non-finite entries", kappa, curvature)
        return self._chol_or_raise(W, s.exp(), (kappa, curvature))

    def _chol_or_raise(self, W: Tensor, s2: Tensor, step: tuple[float, float] | None) -> Tensor:
        """M's Cholesky factor; ``step`` is (kappa, L) for the parameters a step made, None for those it starts from."""
        d = self.model.config.latent_dim
        M = W.T @ W + s2 * torch.eye(d, dtype=W.dtype, device=W.device)
        chol, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            when = "after it" if step is not None else "at the parameters it starts from"
            kappa, curvature = step if step is not None else (float("nan"), float("nan"))
            self._raise(f"M = W^T W + sigma2 I is not positive definite {when} (Cholesky failed at leading minor "
                        f"{int(info)}; sigma2 = {float(s2):.3g}, largest |W| entry {float(W.abs().max()):.3g})",
                        kappa, curvature)
        return chol

    def _raise(self, reason: str, kappa: float, curvature: float) -> None:
        s = self.settings
        N = self.n_total
        where = (f"step {self.steps + 1} (epoch {self.points_seen // N + 1}, {self.points_seen} points seen, "
                 f"batch size {s.batch_size}, --step {s.step})")
        limit = 1.0 / curvature if math.isfinite(curvature) and curvature > 0 else float("nan")
        if not math.isfinite(kappa):  # no step was taken: the starting point is degenerate
            advice = ("start from the data's mean and variance (training.ppca.init_from_data) or from a fitted "
                      "model, with sigma2 well above the rounding error of W^T W")
        elif s.kappa0 is not None:
            advice = (f"the step size kappa = {kappa:.3g} from --kappa0 {s.kappa0:g} was {kappa / limit:.3g} times "
                      f"this step's stability limit 1/L = {limit:.3g}; use --kappa0 auto (the default, capped at "
                      f"1/L) or a --kappa0 below {limit:.3g}")
        else:
            advice = (f"the step size was kappa = {kappa:.3g} (stability limit 1/L = {limit:.3g}); try a smaller "
                      f"--rho0 (now {s.rho0:g}), --step natural, or check the data for extreme rows")
        raise DivergenceError(f"stochastic EM diverged at {where}: {reason}. The parameters from before this step "
                              f"are kept. What to try: {advice}.", step=self.steps + 1, kappa=kappa)
