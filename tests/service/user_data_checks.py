"""Checks shared by the end-to-end tests on user data (imported as a plain module: tests/service is on sys.path)."""

from __future__ import annotations

import math

import numpy as np
import torch


def check_log_likelihood(c, params: dict, upload: bytes, ckpt: dict, model, x: np.ndarray, D: int) -> None:
    """POST /log-likelihood of the PNG `upload` (its pixels: x[0]) against the torch model: exact for ppca (scipy's
    multivariate normal), the seeded bound for the VAEs; bits/dim with D values per image."""
    S, seed = 5, 3
    r = c.post("/log-likelihood", params={**params, "samples": S, "seed": seed},
               files=[("images", ("a.png", upload, "image/png"))])
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    if ckpt["kind"] == "ppca":
        from scipy.stats import multivariate_normal

        Wm, mu, s2 = model.W.detach().numpy(), model.mu.detach().numpy(), float(model.sigma2.detach())
        want_ll = multivariate_normal(mu, Wm @ Wm.T + s2 * np.eye(D)).logpdf(x[0])
        assert res["log_likelihood_exact"]
        assert math.isclose(res["log_likelihood"], want_ll, rel_tol=1e-4)
    else:
        eps = np.random.default_rng(seed).standard_normal((1, S, model.config.latent_dim), dtype=np.float32)
        with torch.no_grad():
            lw = model.log_weights(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(eps)).double()
        assert math.isclose(res["elbo"], float(lw.mean()), rel_tol=1e-3)
        assert math.isclose(res["iw_bound"], float(torch.logsumexp(lw, 1) - math.log(S)), rel_tol=1e-3)
    bpd = -(res["log_likelihood"] - D * math.log(256)) / (D * math.log(2))  # gaussian densities, 256 levels
    assert math.isclose(res["bits_per_dim"], bpd, rel_tol=1e-6)
