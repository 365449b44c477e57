"""The service's inference math in plain numpy, on model outputs: no HTTP, no ONNX Runtime.

Each function is one formula of models/README.md; tests/service/test_numerics.py checks them against
independent references (torch's planar flows, a direct logsumexp).
"""

from __future__ import annotations

import math

import numpy as np

# What a Bernoulli model's figures evaluate: the binarized image (it is a probability only for binary x).
BINARIZATION = "x >= 0.5 -> 1, else 0 (after resizing and invert)"


def planar_flow(z: np.ndarray, u: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z_K = f_K(...f_1(z)), f_k(z) = z + u_k tanh(w_k^T z + b_k), row by row: z [N, d], u_hat and w
    [N, K, d], b [N, K] (the encoder's flow_u, flow_w, flow_b)."""
    for k in range(u.shape[1]):
        a = np.einsum("nd,nd->n", w[:, k], z) + b[:, k]
        z = z + u[:, k] * np.tanh(a)[:, None]
    return z


def bounds_from_log_weights(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ELBO, importance-weighted bound) per row of log_w [N, S], in float64: the mean of the S log-weights,
    and their logsumexp minus log S. A row with a non-finite weight gives non-finite figures (no warning)."""
    lw = log_w.astype(np.float64)
    S = lw.shape[1]
    elbo = lw.mean(axis=1)
    m = lw.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        iw = (m[:, 0] + np.log(np.exp(lw - m).sum(axis=1))) - math.log(S)
    return elbo, iw


def binarize(x: np.ndarray) -> np.ndarray:
    """Intensities -> {0, 1} as BINARIZATION says, float32."""
    return (x >= 0.5).astype(np.float32)


def prior_draws(seed: int, n: int, latent_dim: int, temperature: float) -> np.ndarray:
    """n codes z = temperature * N(0, I) from `numpy.random.default_rng(seed)`, float32 [n, d]."""
    return (temperature * np.random.default_rng(seed).standard_normal((n, latent_dim))).astype(np.float32)
