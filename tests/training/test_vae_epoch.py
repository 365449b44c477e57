"""The training objectives of one VAE step (ELBO and IWAE over k samples, with the KL weight beta) against
losses computed independently from the model's log-weight terms and a plain gradient step."""

import copy
import math

import pytest
import torch

from training.distributed import Dist
from training.vae import VAE, VAEConfig
from training.vae_epoch import GlobalBatches, LogWeightTerms, objective_rows, train_epoch


def _log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/k) sum_i exp(log w_i) per row, by shifting by the row's maximum (not torch.logsumexp)."""
    m = log_w.max(1, keepdim=True).values
    return (log_w - m).exp().mean(1).log() + m[:, 0]


def test_objective_rows_are_the_mean_and_the_log_mean_exp_of_the_weights():
    log_w = torch.tensor([[-600.0, -601.0, -598.5], [3.0, 3.0, 3.0], [-1.0, 20.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(objective_rows(log_w, "elbo"), log_w.mean(1))
    iw = objective_rows(log_w, "iwae")
    torch.testing.assert_close(iw, _log_mean_exp(log_w), rtol=0, atol=1e-12)  # no underflow at -600
    assert iw[1] == pytest.approx(3.0) and iw[2] == pytest.approx(20.0 + math.log((1 + math.exp(-21)
                                                                                + math.exp(-19.5)) / 3))
    assert (iw >= objective_rows(log_w, "elbo")).all()  # Jensen: the IW bound is the tighter one
    one = log_w[:, :1]
    assert torch.equal(objective_rows(one, "iwae"), objective_rows(one, "elbo"))  # k = 1: the same bound
    with pytest.raises(ValueError, match="objective must be one of"):
        objective_rows(log_w, "kl")


def _vae(seed=0) -> VAE:
    torch.manual_seed(seed)
    cfg = VAEConfig(data_dim=10, latent_dim=3, encoder_hidden=(8,), decoder_hidden=(8,), flows=2)
    return VAE(cfg).double().train()


@pytest.mark.parametrize("objective, k, beta", [("iwae", 4, 1.0), ("iwae", 3, 0.3), ("elbo", 3, 0.3),
                                                ("iwae", 1, 0.5)])
def test_one_step_descends_the_objective_computed_independently(objective, k, beta):
    """One global batch of all 12 rows, plain SGD at rate 0.5: the step is -0.5 times the gradient of
    -mean_rows[log (1/k) sum_i w_i^beta] (iwae) or -mean_rows[mean_i log w_i^beta] (elbo), with
    log w^beta = log p(x|z) + beta (log p(z) - log q_0 + log det), on the same eps the step drew."""
    x = (torch.rand(12, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64) < 0.5).double()
    model = _vae()
    reference = copy.deepcopy(model)
    seen = []

    def fetch(rows):
        seen.append(rows)
        return x[rows]

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = GlobalBatches(12, 12, Dist(), seed=0)
    elbo_sum, step = train_epoch(LogWeightTerms(model), opt, fetch, batches, 1, latent_dim=3,
                                 gen=torch.Generator().manual_seed(7), binarize=False, step=0,
                                 schedule=lambda s: (0.5, beta), objective=objective, k=k)
    assert step == 1 and len(seen) == 1
    eps = torch.randn((12, k, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    log_px_z, log_pz, log_q0, log_det = reference.log_weight_terms(x[seen[0]], eps)
    kl = log_pz - log_q0 + log_det
    log_w_beta = log_px_z + beta * kl
    per_row = _log_mean_exp(log_w_beta) if objective == "iwae" else log_w_beta.mean(1)
    (-per_row.mean()).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # the gradient reaches every parameter
        torch.testing.assert_close(q.detach(), p.detach() - 0.5 * p.grad, rtol=0, atol=1e-10, msg=name)
    # the reported figure is the ELBO at beta = 1: the mean of the k log w, whatever the objective
    assert float(elbo_sum) == pytest.approx(float((log_px_z + kl).detach().mean(1).sum()), abs=1e-9)


def test_iwae_with_one_sample_takes_the_elbo_steps():
    x = torch.rand(30, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    models = {}
    for objective in ("elbo", "iwae"):
        model = _vae()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        train_epoch(LogWeightTerms(model), opt, lambda rows: x[rows], GlobalBatches(30, 8, Dist(), seed=1), 1,
                    latent_dim=3, gen=torch.Generator().manual_seed(3), binarize=False, objective=objective, k=1)
        models[objective] = model
    for p, q in zip(models["elbo"].parameters(), models["iwae"].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(next(_vae().parameters()), next(models["elbo"].parameters()))  # it did train
