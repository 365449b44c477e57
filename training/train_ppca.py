"""Driver for `python -m training fit --model ppca`: fit by closed form, EM or stochastic EM, then
write the checkpoint, `metrics.json` and plots. The math lives in :mod:`training.ppca`.

Under torchrun each rank holds its own rows (training/shards.py) and every fit runs on all-reduced sums:
the closed form from N, sum x and the scatter, EM from one all-reduce of its sufficient statistics per
iteration, stochastic EM from each step's batch sums; the log-likelihoods are sums and counts. Every rank
then holds the same parameters and takes the same stopping decision; rank 0 writes the files."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import plots, progress
from training.common import (
    CHECKPOINT,
    METRICS,
    bits_figures,
    run_meta,
    save_checkpoint,
    seed_everything,
    write_json,
)
from training.config import FitJob, option
from training.data import ImageData
from training.distributed import Dist, single
from training.ppca import (
    PPCA,
    PPCAConfig,
    closed_form,
    closed_form_from_sums,
    em_step,
    init_from_data,
    mean_log_prob,
)
from training.ppca_sem import SAMPLINGS, STEPS, DivergenceError, SEMSettings, StochasticEM
from training.shards import local, reopen_dataset

METHODS = ("em", "sem", "closed-form")
EM_MAX_ITERATIONS = 5000  # a cap a converging fit does not reach: EM stops at --tol (docs/benchmarks.md)
SEM_EPOCHS = 60  # past where the gap to the optimum stops shrinking on digits and mnist5k (docs/benchmarks.md)
LIKELIHOOD = "gaussian"  # p(x | z) = N(mu + W z, sigma2 I): a density, so bits/dim read 256 levels per pixel
_SEM = SEMSettings()  # the stochastic EM's defaults are its own (training/ppca_sem.py)


def _kappa0(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None


@dataclass(frozen=True)
class PPCAFit:
    """`fit --model ppca` settings (the `ppca` group of `python -m training fit --model ppca --help`)."""

    method: str = option("em", "how to fit: exact EM converges to the maximum likelihood like the closed form and "
                         "shows the curve; sem is stochastic EM", choices=METHODS)
    latent_dim: int = option(10, "d, number of latent dimensions (10 explains most of digits' variance)")
    iterations: int | None = option(None, f"EM: maximum iterations (default {EM_MAX_ITERATIONS}); SEM: epochs over "
                                    f"the data (default {SEM_EPOCHS})", type=int)
    tol: float = option(1e-7, "EM stops when the log-likelihood gains less than this many nats/image in an "
                        "iteration (a float64 fit is converged to its last digits by then)")
    batch_size: int = option(_SEM.batch_size, "SEM: rows per step, from 1 to all of them")
    step: str = option(_SEM.step, "SEM M'-step: natural (Fisher-preconditioned gradient) or plain (the raw gradient "
                       "in data-scaled coordinates); equations in training/ppca_sem.py", choices=STEPS)
    sampling: str = option(_SEM.sampling, "SEM rows per step: epochs (shuffled passes) or with-replacement (uniform "
                           "draws)", choices=SAMPLINGS)
    kappa0: float | None = option(_SEM.kappa0, "SEM step size: auto (the default) is min(1/L_t, B eta(n)), capped at "
                                  "the stability limit 1/L_t; a number K is the hand-tuned kappa_t = K / (1 + "
                                  "t/t0)^power with no cap", type=_kappa0, metavar="auto|K")
    rho0: float = option(_SEM.rho0, "SEM, --kappa0 auto: rate per data point, as a fraction of the one-row "
                         "stability limit")
    power: float = option(_SEM.power, "SEM: decay exponent of the step size, in (0.5, 1] (Robbins-Monro)")
    t0: float = option(_SEM.t0, "SEM with a number --kappa0: steps before kappa_t decays")
    chunk_size: int = option(4096, "rows per chunk in EM sums and evaluation (bounds the memory of a pass)")

    def sem(self) -> SEMSettings:
        return SEMSettings(step=self.step, sampling=self.sampling, batch_size=self.batch_size, kappa0=self.kappa0,
                           rho0=self.rho0, power=self.power, t0=self.t0)

    def sem_record(self) -> dict:
        """The SEM settings as the checkpoint and metrics record them (kappa0 'auto' for the automatic rule)."""
        record = asdict(self.sem())
        return {**record, "kappa0": "auto" if record["kappa0"] is None else record["kappa0"]}


Options = PPCAFit


def fit(job: FitJob, data: ImageData, out: Path, dist: Dist | None = None) -> dict:
    cfg: PPCAFit = job.model
    run = job.run
    dist = dist or single(run.device)
    out = Path(out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    device = dist.device
    reduce = dist.sum if dist.enabled else None
    x = torch.as_tensor(local(data.train, dist)[1], dtype=torch.float64, device=device)
    config = PPCAConfig(data_dim=data.data_dim, latent_dim=cfg.latent_dim)
    model = PPCA(config).to(device)
    generator = torch.Generator(device=device).manual_seed(run.seed)  # the same W on every rank
    history: list[float] = []
    start = time.perf_counter()

    if cfg.method == "closed-form":
        model.set_parameters(*(closed_form(x, cfg.latent_dim) if reduce is None
                               else closed_form_from_sums(x, cfg.latent_dim, reduce)))
        history.append(mean_log_prob(model, x, cfg.chunk_size, reduce))
        iterations = 0
    elif cfg.method == "em":
        init_from_data(model, x, generator, reduce)
        iterations = _fit_em(model, x, cfg, history, run.quiet, dist)
    elif cfg.method == "sem":
        init_from_data(model, x, generator, reduce)
        if dist.rank > 0:  # each rank draws its own rows and noise; rank 0 goes on with the one-process stream
            generator = torch.Generator(device=device).manual_seed(dist.rank_seed(run.seed))
        try:
            iterations = _fit_sem(model, x, cfg, history, generator, run.quiet, dist)
        except DivergenceError as e:
            # The model holds the parameters from before the failed step: keep them for inspection.
            meta = run_meta(job.data, data, {"method": "sem", "diverged": str(e), **cfg.sem_record()}, history)
            path = out / CHECKPOINT
            if dist.is_main:
                save_checkpoint(out, kind="ppca", config=asdict(config), state_dict=model.cpu().state_dict(),
                                meta=meta)
            raise DivergenceError(f"{e} The last good parameters are saved in {path}.", step=e.step,
                                  kappa=e.kappa) from None
    else:  # argparse restricts --method; this guards callers that build the settings by hand
        raise ValueError(f"unknown method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    seconds = time.perf_counter() - start

    settings = {
        "method": cfg.method,
        "latent_dim": cfg.latent_dim,
        "iterations": iterations,
        "tol": cfg.tol,
        "seed": run.seed,
        "device": str(device),
        **dist.record(),
        "seconds": seconds,
    }
    if cfg.method == "sem":
        settings.update(cfg.sem_record())
    meta = run_meta(job.data, data, settings, history)
    progress.current().phase("evaluating")
    if dist.is_main:
        save_checkpoint(out, kind="ppca", config=asdict(config), state_dict=model.cpu().state_dict(), meta=meta)
    metrics = {
        "model": "ppca",
        "method": cfg.method,
        "dataset": data.summary(),
        "iterations": iterations,
        "seconds": seconds,
        **dist.record(),
        **_figures(model.to(device), data, cfg.chunk_size, dist),
    }
    if dist.is_main:
        write_json(out / METRICS, metrics)
        _plots(model.cpu(), data, history, cfg.method, out)
    return metrics


def _fit_em(model: PPCA, x: torch.Tensor, cfg: PPCAFit, history: list[float], quiet: bool, dist: Dist) -> int:
    """EM until an iteration gains less than --tol: the log-likelihood is all-reduced, so all ranks stop together."""
    reduce = dist.sum if dist.enabled else None
    max_iter = cfg.iterations or EM_MAX_ITERATIONS
    bar = tqdm(range(1, max_iter + 1), desc="EM", unit="it", disable=quiet or not dist.is_main)
    prev = -np.inf
    for it in bar:
        em_step(model, x, cfg.chunk_size, reduce)
        ll = mean_log_prob(model, x, cfg.chunk_size, reduce)
        history.append(ll)
        bar.set_postfix(loglik=f"{ll:.6f}", gain=f"{ll - prev:.2e}", refresh=False)
        progress.current().step(it, max_iter, "iteration", gain=(ll - prev, cfg.tol), **{"log-lik": ll})
        if ll - prev < cfg.tol:
            return it
        prev = ll
    return max_iter


def _fit_sem(model: PPCA, x: torch.Tensor, cfg: PPCAFit, history: list[float], generator: torch.Generator,
             quiet: bool, dist: Dist) -> int:
    """Epochs of N points each (whatever the batch size); the exact log-likelihood after each."""
    epochs = cfg.iterations or SEM_EPOCHS
    sem = StochasticEM(model, x, cfg.sem(), generator, dist)
    reduce = dist.sum if dist.enabled else None
    bar = tqdm(range(1, epochs + 1), desc="SEM", unit="epoch", disable=quiet or not dist.is_main)
    for epoch in bar:
        sem.advance(sem.n_total)
        ll = mean_log_prob(model, x, cfg.chunk_size, reduce)
        history.append(ll)
        bar.set_postfix(loglik=f"{ll:.4f}", kappa=f"{sem.last_kappa:.2e}", refresh=False)
        progress.current().step(epoch, epochs, "epoch", **{"log-lik": ll})
    return epochs


def _figures(model: PPCA, data: ImageData, chunk_size: int, dist: Dist | None = None) -> dict:
    """Exact log-likelihoods per split: over ranks, each rank's own rows, reduced as a sum and a count."""
    dist = dist or Dist()
    reduce = dist.sum if dist.enabled else None
    figures = {"log_likelihood_exact": True}
    for split in ("train", "valid", "test"):
        rows = getattr(data, split)
        x = torch.as_tensor(local(rows, dist)[1], dtype=torch.float64, device=model.W.device)
        ll = mean_log_prob(model, x, chunk_size, reduce) if len(rows) else None
        figures[f"{split}_log_likelihood"] = ll
        figures[f"{split}_bits_per_dim"], note = bits_figures(ll, data, LIKELIHOOD)
    figures["sigma2"] = float(model.sigma2.detach())
    figures["bits_per_dim_note"] = note
    return figures


@torch.no_grad()
def _plots(model: PPCA, data: ImageData, history: list[float], method: str, out: Path) -> None:
    if len(history) > 1:
        plots.save_curves({"train": history}, out / "loglik.png", title=f"PPCA ({method}) log-likelihood",
                          xlabel="iteration" if method == "em" else "epoch", ylabel="nats / image")
    # W is identified up to a rotation W R; its left singular vectors are the principal directions
    # whatever R the fit ended in (EM and SEM do not align them), ordered by the variance they explain.
    U, s, _ = np.linalg.svd(model.W.detach().numpy(), full_matrices=False)
    directions = plots.as_images((U[:, :16] * s[:16]).T, data.pixel_shape)
    plots.save_image_grid(directions, out / "directions.png", "principal directions (left singular vectors of W)",
                          symmetric=True)
    x, _ = model.sample(16, torch.Generator().manual_seed(0))
    plots.save_image_grid(plots.as_images(x.clamp(0, 1).numpy(), data.pixel_shape), out / "samples.png",
                          "samples x ~ p(x)")


def build_model(ckpt: dict) -> PPCA:
    model = PPCA(PPCAConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def evaluate(ckpt: dict, *, samples: int, seed: int, device: str) -> dict:
    """Test figures of a fitted PPCA: the exact log-likelihood (no sampling: `samples` and `seed` unused)."""
    model = build_model(ckpt)
    meta = ckpt["meta"]
    data = reopen_dataset(meta)
    x = torch.as_tensor(np.asarray(data.test), dtype=torch.float64)
    ll = mean_log_prob(model, x)
    return {
        "model": "ppca",
        "dataset": meta["dataset"],
        "n_test": len(data.test),
        "test_log_likelihood": ll,
        "log_likelihood_exact": True,
        "test_bits_per_dim": bits_figures(ll, data, LIKELIHOOD)[0],
        "latent_dim": model.config.latent_dim,
        "sigma2": float(model.sigma2.detach()),
    }
