"""The service agrees with the training package: ONNX/torch encoders, the bound with the same eps, sklearn's PCA."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch


def _torch_model(model_repo, name):
    from training.common import load_checkpoint
    from training.drivers import driver_for

    ckpt = load_checkpoint(model_repo / name)
    return driver_for(ckpt["kind"]).build_model(ckpt)


@pytest.mark.parametrize("name", ["ppca-digits", "vae-digits", "flow-vae-digits"])
def test_encode_means_equal_onnx_and_torch(client, model_repo, need, digits, name):
    need(name)
    x = digits.test[:16].astype(np.float32)
    r = client.post(f"/encode?model={name}", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    mean = np.array([res["mean"] for res in r.json()["results"]], np.float32)
    log_var = np.array([res["log_var"] for res in r.json()["results"]], np.float32)
    session = ort.InferenceSession(str(model_repo / name / "encoder.onnx"), providers=["CPUExecutionProvider"])
    onnx_mean, onnx_log_var = session.run(["mean", "log_var"], {"x": x})
    np.testing.assert_allclose(mean, onnx_mean, atol=1e-6)
    np.testing.assert_allclose(log_var, onnx_log_var, atol=1e-6)
    model = _torch_model(model_repo, name)
    with torch.no_grad():
        if name.startswith("ppca"):
            t_mean, t_cov = model.posterior(torch.as_tensor(x, dtype=torch.float64))
            t_mean = t_mean.numpy()
        else:
            t_mean = model.encode(torch.as_tensor(x))[0].numpy()
    np.testing.assert_allclose(mean, t_mean, atol=1e-4)


@pytest.mark.parametrize("name", ["vae-digits", "flow-vae-digits"])
def test_log_likelihood_equals_training_figures_with_same_eps(client, model_repo, need, digits, name):
    need(name)
    S, seed = 30, 11
    x = (digits.test[:10] >= 0.5).astype(np.float32)  # binary: what the service evaluates for Bernoulli models
    r = client.post(f"/log-likelihood?model={name}&samples={S}&seed={seed}", json={"images": x.tolist()}).json()
    eps = np.random.default_rng(seed).standard_normal((len(x), S, 4), dtype=np.float32)
    # the exported bound graph on the same eps: the same figures up to float32 rounding of the sum order
    bound = ort.InferenceSession(str(model_repo / name / "bound.onnx"), providers=["CPUExecutionProvider"])
    log_w_onnx = bound.run(None, {"x": x, "eps": eps})[0].astype(np.float64)
    # the torch model (training's evaluate computes these from log_weights) on the same eps
    model = _torch_model(model_repo, name)
    with torch.no_grad():
        log_w_torch = model.log_weights(torch.as_tensor(x), torch.as_tensor(eps)).double().numpy()
    for log_w, tol in ((log_w_onnx, 1e-5), (log_w_torch, 1e-4)):
        elbo = log_w.mean(1)
        iw = np.logaddexp.reduce(log_w, axis=1) - math.log(S)
        for i, res in enumerate(r["results"]):
            assert res["elbo"] == pytest.approx(elbo[i], rel=tol)
            assert res["iw_bound"] == pytest.approx(iw[i], rel=tol)
            assert res["bits_per_dim"] == pytest.approx(-iw[i] / (64 * math.log(2)), rel=tol)
    # and with torch's own importance_weighted_bound routine, fed the same eps row by row
    assert np.mean([res["iw_bound"] for res in r["results"]]) == pytest.approx(
        float(np.mean(np.logaddexp.reduce(log_w_torch, axis=1) - math.log(S))), rel=1e-5)


def test_ppca_exact_log_likelihood_equals_sklearn(client, model_repo, digits):
    from sklearn.decomposition import PCA

    x = digits.test[:50]
    r = client.post("/log-likelihood?model=ppca-digits", json={"images": x.tolist()}).json()
    ll = np.array([res["log_likelihood"] for res in r["results"]])
    assert all(res["log_likelihood_exact"] for res in r["results"])
    train = digits.train  # the rows the closed-form fit saw (validation rows excluded)
    N = len(train)
    pca = PCA(n_components=5, svd_solver="full").fit(train)
    # sklearn's covariance divides by N - 1, the ML solution by N: rescale it, then the densities agree exactly
    C = pca.get_covariance() * (N - 1) / N
    xc = x - pca.mean_
    _, logdet = np.linalg.slogdet(C)
    exact = -0.5 * (64 * np.log(2 * np.pi) + logdet + np.einsum("nd,nd->n", xc, np.linalg.solve(C, xc.T).T))
    np.testing.assert_allclose(ll, exact, atol=1e-2)
    # and sklearn's own score_samples (N - 1 convention) within a small fraction of a nat
    np.testing.assert_allclose(ll, pca.score_samples(x), atol=0.2)
