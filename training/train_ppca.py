"""Driver for `python -m training fit --model ppca`: fit by closed form, EM or stochastic EM, then
write the checkpoint, `metrics.json` and plots. The math lives in :mod:`training.ppca`."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import plots, progress
from training.common import (
    METRICS,
    bits_per_dim,
    resolve_device,
    run_meta,
    save_checkpoint,
    seed_everything,
    write_json,
)
from training.data import ImageData, reload_dataset
from training.ppca import (
    PPCA,
    PPCAConfig,
    closed_form,
    em_step,
    init_from_data,
    mean_log_prob,
)
from training.ppca_sem import SAMPLINGS, STEPS, DivergenceError, SEMSettings, StochasticEM

METHODS = ("em", "sem", "closed-form")
# Figures for [0, 1] data are densities; bits/dim reads them as 256 levels per pixel.
DISCRETE_BINS = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ppca")
    g.add_argument("--method", choices=METHODS, default="em", help="how to fit (default: em)")
    g.add_argument("--latent-dim", type=int, default=10, help="d, number of latent dimensions")
    g.add_argument("--iterations", type=int, default=None,
                   help="EM: maximum iterations (default 5000); SEM: epochs over the data (default 60)")
    g.add_argument("--tol", type=float, default=1e-7,
                   help="EM stops when the log-likelihood gains less than this many nats/image in an iteration")
    g.add_argument("--batch-size", type=int, default=100, help="SEM: rows per step, from 1 to all of them")
    g.add_argument("--step", choices=STEPS, default="natural",
                   help="SEM M'-step: natural (Fisher-preconditioned gradient, default) or plain (the raw gradient "
                        "in data-scaled coordinates); equations in training/ppca_sem.py")
    g.add_argument("--sampling", choices=SAMPLINGS, default="epochs",
                   help="SEM rows per step: epochs (shuffled passes, default) or with-replacement (uniform draws)")
    g.add_argument("--kappa0", type=_kappa0, default=None, metavar="auto|K",
                   help="SEM step size: auto (default) is min(1/L_t, B eta(n)), capped at the stability limit 1/L_t; "
                        "a number K is the hand-tuned kappa_t = K / (1 + t/t0)^power with no cap")
    g.add_argument("--rho0", type=float, default=0.1,
                   help="SEM, --kappa0 auto: rate per data point, as a fraction of the one-row stability limit")
    g.add_argument("--power", type=float, default=1.0,
                   help="SEM: decay exponent of the step size, in (0.5, 1] (Robbins-Monro)")
    g.add_argument("--t0", type=float, default=500.0, help="SEM with a number --kappa0: steps before kappa_t decays")
    g.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk in EM sums and evaluation")


def _kappa0(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None


def fit(args: argparse.Namespace, data: ImageData, out: Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    x = torch.as_tensor(data.train, dtype=torch.float64, device=device)
    config = PPCAConfig(data_dim=data.data_dim, latent_dim=args.latent_dim)
    model = PPCA(config).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    history: list[float] = []
    start = time.perf_counter()

    if args.method == "closed-form":
        model.set_parameters(*closed_form(x, args.latent_dim))
        history.append(mean_log_prob(model, x, args.chunk_size))
        iterations = 0
    elif args.method == "em":
        init_from_data(model, x, generator)
        iterations = _fit_em(model, x, args, history)
    elif args.method == "sem":
        init_from_data(model, x, generator)
        try:
            iterations = _fit_sem(model, x, args, history, generator)
        except DivergenceError as e:
            # The model holds the parameters from before the failed step: keep them for inspection.
            meta = run_meta(args, data, {"method": "sem", "diverged": str(e), **_sem_record(args)}, history)
            path = save_checkpoint(out, kind="ppca", config=asdict(config), state_dict=model.cpu().state_dict(),
                                   meta=meta)
            raise DivergenceError(f"{e} The last good parameters are saved in {path}.", step=e.step,
                                  kappa=e.kappa) from None
    else:  # argparse restricts --method; this guards callers that build args by hand
        raise ValueError(f"unknown method {args.method!r}: expected one of {', '.join(METHODS)}")
    seconds = time.perf_counter() - start

    settings = {
        "method": args.method,
        "latent_dim": args.latent_dim,
        "iterations": iterations,
        "tol": args.tol,
        "seed": args.seed,
        "device": str(device),
        "seconds": seconds,
    }
    if args.method == "sem":
        settings.update(_sem_record(args))
    meta = run_meta(args, data, settings, history)
    progress.reporter(args).phase("evaluating")
    model = model.cpu()
    save_checkpoint(out, kind="ppca", config=asdict(config), state_dict=model.state_dict(), meta=meta)
    metrics = {
        "model": "ppca",
        "method": args.method,
        "dataset": data.summary(),
        "iterations": iterations,
        "seconds": seconds,
        **_figures(model, data, args.chunk_size),
    }
    write_json(out / METRICS, metrics)
    _plots(model, data, history, args.method, out)
    return metrics


def _fit_em(model: PPCA, x: torch.Tensor, args: argparse.Namespace, history: list[float]) -> int:
    max_iter = args.iterations or 5000
    bar = tqdm(range(1, max_iter + 1), desc="EM", unit="it", disable=args.quiet)
    prev = -np.inf
    for it in bar:
        em_step(model, x, args.chunk_size)
        ll = mean_log_prob(model, x, args.chunk_size)
        history.append(ll)
        bar.set_postfix(loglik=f"{ll:.6f}", gain=f"{ll - prev:.2e}", refresh=False)
        progress.reporter(args).step(it, max_iter, "iteration", gain=(ll - prev, args.tol), **{"log-lik": ll})
        if ll - prev < args.tol:
            return it
        prev = ll
    return max_iter


def _sem_settings(args: argparse.Namespace) -> SEMSettings:
    return SEMSettings(step=args.step, sampling=args.sampling, batch_size=args.batch_size, kappa0=args.kappa0,
                       rho0=args.rho0, power=args.power, t0=args.t0)


def _sem_record(args: argparse.Namespace) -> dict:
    """The SEM settings as the checkpoint and metrics record them (kappa0 'auto' for the automatic rule)."""
    record = asdict(_sem_settings(args))
    return {**record, "kappa0": "auto" if record["kappa0"] is None else record["kappa0"]}


def _fit_sem(model: PPCA, x: torch.Tensor, args: argparse.Namespace, history: list[float],
             generator: torch.Generator) -> int:
    """Epochs of N points each (whatever the batch size); the exact log-likelihood after each."""
    epochs = args.iterations or 60
    sem = StochasticEM(model, x, _sem_settings(args), generator)
    bar = tqdm(range(1, epochs + 1), desc="SEM", unit="epoch", disable=args.quiet)
    for epoch in bar:
        sem.advance(len(x))
        ll = mean_log_prob(model, x, args.chunk_size)
        history.append(ll)
        bar.set_postfix(loglik=f"{ll:.4f}", kappa=f"{sem.last_kappa:.2e}", refresh=False)
        progress.reporter(args).step(epoch, epochs, "epoch", **{"log-lik": ll})
    return epochs


def _figures(model: PPCA, data: ImageData, chunk_size: int) -> dict:
    figures = {"log_likelihood_exact": True}
    for split in ("train", "valid", "test"):
        rows = getattr(data, split)
        ll = mean_log_prob(model, torch.as_tensor(rows, dtype=torch.float64), chunk_size) if len(rows) else None
        figures[f"{split}_log_likelihood"] = ll
        figures[f"{split}_bits_per_dim"] = (
            None if ll is None else bits_per_dim(ll, data.data_dim, discrete_bins=DISCRETE_BINS)
        )
    figures["sigma2"] = float(model.sigma2.detach())
    figures["bits_per_dim_note"] = (
        f"density on [0, 1] data read as {DISCRETE_BINS} levels per pixel: "
        f"(-log p(x) + D log {DISCRETE_BINS}) / (D ln 2)"
    )
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


def evaluate(ckpt: dict, args: argparse.Namespace) -> dict:
    """Test figures of a fitted PPCA: the exact log-likelihood (no sampling involved)."""
    model = build_model(ckpt)
    meta = ckpt["meta"]
    data = reload_dataset(meta)
    x = torch.as_tensor(data.test, dtype=torch.float64)
    ll = mean_log_prob(model, x)
    return {
        "model": "ppca",
        "dataset": meta["dataset"],
        "n_test": len(data.test),
        "test_log_likelihood": ll,
        "log_likelihood_exact": True,
        "test_bits_per_dim": bits_per_dim(ll, data.data_dim, discrete_bins=DISCRETE_BINS),
        "latent_dim": model.config.latent_dim,
        "sigma2": float(model.sigma2.detach()),
    }
