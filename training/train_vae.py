"""Driver for `python -m training fit --model vae|flow-vae`: train by the reparametrized ELBO with Adam,
keep the parameters with the best validation ELBO, then write the checkpoint, `metrics.json` (ELBOs and
the test importance-weighted log-likelihood) and plots. The model lives in :mod:`training.vae`.

    python -m training fit --model flow-vae --dataset mnist5k-bin --out runs/flow-vae

Bernoulli models on binary data whose continuous intensities are known (`mnist5k-bin`) see a fresh
stochastic binarization of the training rows every epoch (each pixel is 1 with probability equal to its
intensity, as :func:`training.data.binarize`); validation and test rows stay the fixed binarized rows.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

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
from training.vae import ACTIVATIONS, FLOW_TYPES, LIKELIHOODS, VAE, VAEConfig

DEFAULT_FLOWS = {"vae": 0, "flow-vae": 10}
SCHEDULES = ("constant", "cosine")
# Gaussian figures are densities on [0, 1] data; bits/dim reads them as 256 levels per pixel.
DISCRETE_BINS = 256
ELBO_SAMPLES = 10  # S for the reported ELBOs (train / valid / test): a lower-variance MC estimate
VALID_SAMPLES = 4  # S per validation row for model selection each epoch (the same eps every epoch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vae / flow-vae")
    g.add_argument("--latent-dim", type=int, default=40, help="d, number of latent dimensions")
    g.add_argument("--hidden", type=int, nargs="+", default=[512, 512], help="encoder hidden layer sizes")
    g.add_argument("--decoder-hidden", type=int, nargs="+", default=None,
                   help="decoder hidden layer sizes (default: the encoder's, reversed)")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
    g.add_argument("--flows", type=int, default=None,
                   help="K planar flows (default: 10 for flow-vae, 0 for vae)")
    g.add_argument("--flow-type", choices=FLOW_TYPES, default="amortized",
                   help="amortized: flow parameters per image from the encoder; global: shared parameters")
    g.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                   help="p(x|z) (default: bernoulli for binary data, gaussian otherwise)")
    g.add_argument("--var-floor", type=float, default=1e-3, help="gaussian: lower bound on the pixel variance")
    g.add_argument("--epochs", type=int, default=600,
                   help="maximum epochs (600: after 300 the validation ELBO still rose; doubling them gained 1.1 "
                        "(vae) and 2.9 (flow-vae) nats of test NLL on the mean of 3 seeds, docs/benchmarks.md)")
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine",
                   help="cosine: decay the learning rate to 0 over --epochs (per step)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="decoupled weight decay (AdamW; 0 gives Adam): the main remedy against overfitting 3,600 rows")
    g.add_argument("--warmup-epochs", type=float, default=100.0,
                   help="KL warm-up: the weight of log p(z) - log q(z|x) rises linearly from 0 to 1 over these epochs")
    g.add_argument("--patience", type=int, default=30,
                   help="stop after this many epochs without a better validation ELBO (0: never)")
    g.add_argument("--dynamic-binarization", action=argparse.BooleanOptionalAction, default=None,
                   help="re-binarize the continuous training rows each epoch (default: on when they exist)")
    g.add_argument("--eval-samples", type=int, default=1000,
                   help="S for the test importance-weighted log-likelihood in metrics.json")
    g.add_argument("--chunk", type=int, default=50_000, help="(row, sample) pairs per pass when evaluating")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 by default: at batch 100 a second thread "
                        "gains little, and on a busy machine OpenMP threads waiting on each other slow "
                        "training down tens of times (see docs/benchmarks.md)")
    g.add_argument("--time-limit", type=float, default=None,
                   help="stop training after this many seconds (the best epoch so far is kept)")


def _config(args: argparse.Namespace, data: ImageData) -> VAEConfig:
    flows = DEFAULT_FLOWS[args.model] if args.flows is None else args.flows
    if args.model == "vae" and flows != 0:
        raise ValueError(f"--model vae has no flows, got --flows {flows}; use --model flow-vae")
    if args.model == "flow-vae" and flows < 1:
        raise ValueError(f"--model flow-vae needs --flows >= 1, got {flows}; use --model vae for none")
    likelihood = args.likelihood or ("bernoulli" if data.binary else "gaussian")
    return VAEConfig(
        data_dim=data.data_dim, latent_dim=args.latent_dim, encoder_hidden=tuple(args.hidden),
        decoder_hidden=tuple(args.decoder_hidden or args.hidden[::-1]), activation=args.activation,
        likelihood=likelihood, var_floor=args.var_floor, flows=flows, flow_type=args.flow_type,
    )


def fit(args: argparse.Namespace, data: ImageData, out: Path) -> dict:
    if len(data.valid) == 0:
        raise ValueError("vae training selects its epoch on validation rows: use --valid-fraction > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    device = resolve_device(args.device)
    if device.type == "cpu" and getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    cfg = _config(args, data)
    model = VAE(cfg).to(device)
    dynamic = args.dynamic_binarization
    if dynamic is None:
        dynamic = data.train_probs is not None and cfg.likelihood == "bernoulli"
    if dynamic and data.train_probs is None:
        raise ValueError(f"--dynamic-binarization needs continuous training intensities, which dataset "
                         f"{data.name!r} does not have (only mnist5k-bin does)")

    f32 = dict(dtype=torch.float32, device=device)
    x_train = torch.as_tensor(data.train_probs if dynamic else data.train, **f32)
    x_valid = torch.as_tensor(data.valid, **f32)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    valid_eps = torch.randn((len(x_valid), VALID_SAMPLES, cfg.latent_dim), generator=gen, **f32)

    n, B = len(x_train), args.batch_size
    steps_per_epoch = math.ceil(n / B)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    opt = _optimizer(model, args)

    def schedule(step: int) -> tuple[float | None, float]:
        """(learning rate or None to leave it, KL weight beta) for optimizer step `step` (0-based)."""
        lr = (0.5 * args.lr * (1.0 + math.cos(math.pi * step / total_steps))
              if args.lr_schedule == "cosine" else None)
        beta = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return lr, beta

    history: dict[str, list[float]] = {"train ELBO": [], "valid ELBO": []}
    best = {"elbo": -math.inf, "epoch": 0, "state": None}
    step, epoch = 0, 0
    start = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc=args.model, unit="epoch", disable=args.quiet)
    report = progress.reporter(args)  # to build-defaults, when it started this fit
    for epoch in bar:
        model.train()
        xs = (torch.rand(x_train.shape, generator=gen, **f32) < x_train).float() if dynamic else x_train
        elbo_sum, step = train_epoch(model, opt, xs, batch_size=B, gen=gen, step=step, schedule=schedule)
        train_elbo = float(elbo_sum) / n
        if not math.isfinite(train_elbo):
            raise FloatingPointError(
                f"{args.model} training diverged in epoch {epoch}: the training ELBO is {train_elbo} "
                f"(learning rate {args.lr}); lower --lr or check the data for NaN/inf")
        model.eval()
        with torch.no_grad():
            valid_elbo = float(model.log_weights(x_valid, valid_eps).mean())
        history["train ELBO"].append(train_elbo)
        history["valid ELBO"].append(valid_elbo)
        if valid_elbo > best["elbo"]:
            best = {"elbo": valid_elbo, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{-train_elbo:.2f}", valid_elbo=f"{valid_elbo:.2f}", best=f"{best['elbo']:.2f}",
                        s_per_epoch=f"{elapsed / epoch:.2f}", refresh=False)
        report.step(epoch, args.epochs, "epoch", **{"train ELBO": train_elbo, "valid ELBO": valid_elbo})
        if args.patience and epoch - best["epoch"] >= args.patience:
            break
        if args.time_limit is not None and elapsed >= args.time_limit:
            break
    seconds = time.perf_counter() - start
    if best["state"] is None:
        raise FloatingPointError(f"{args.model}: no epoch gave a finite validation ELBO")
    model.load_state_dict(best["state"])
    model = model.eval()

    settings = {
        "model": args.model, "latent_dim": cfg.latent_dim, "hidden": list(cfg.encoder_hidden),
        "decoder_hidden": list(cfg.decoder_hidden), "activation": cfg.activation, "flows": cfg.flows,
        "flow_type": cfg.flow_type if cfg.flows else None, "likelihood": cfg.likelihood,
        "epochs": args.epochs, "epochs_run": epoch, "best_epoch": best["epoch"], "batch_size": B,
        "lr": args.lr, "lr_schedule": args.lr_schedule, "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs, "patience": args.patience, "dynamic_binarization": dynamic,
        "optimizer": type(opt).__name__, "seed": args.seed, "device": str(device),
        "threads": torch.get_num_threads(), "seconds": seconds,
    }
    meta = run_meta(args, data, settings, history)
    config = asdict(cfg)
    config["encoder_hidden"], config["decoder_hidden"] = list(cfg.encoder_hidden), list(cfg.decoder_hidden)
    save_checkpoint(out, kind=args.model, config=config,
                    state_dict={k: v.cpu() for k, v in model.state_dict().items()}, meta=meta)
    report.phase("evaluating")
    eval_start = time.perf_counter()
    figures = _figures(model, data, S=args.eval_samples, chunk=args.chunk, seed=args.seed, device=device)
    metrics = {
        "model": args.model,
        "dataset": data.summary(),
        "epochs": epoch,
        "best_epoch": best["epoch"],
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(epoch, 1),
        "eval_seconds": time.perf_counter() - eval_start,
        **figures,
    }
    write_json(out / METRICS, metrics)
    _plots(model.cpu(), data, history, args.model, out)
    return metrics


def train_epoch(model: VAE, opt: torch.optim.Optimizer, xs: torch.Tensor, *, batch_size: int,
                gen: torch.Generator, step: int = 0, schedule=None) -> tuple[torch.Tensor, int]:
    """One pass over the rows of `xs` in a random order, one Adam step per minibatch of one sample each.

    loss = -mean_n [log p(x|z_K) + beta (log p(z_K) - log q_0(z_0|x) + sum log|det J|)], with
    (lr, beta) = schedule(step) (beta = 1 and a fixed lr without one). Returns the sum over rows of
    the ELBO estimates (beta = 1, as a tensor: no device sync per step) and the next step number.
    """
    n, d = len(xs), model.config.latent_dim
    perm = torch.randperm(n, generator=gen, device=xs.device)
    elbo_sum = torch.zeros((), dtype=xs.dtype, device=xs.device)
    for i in range(0, n, batch_size):
        x = xs[perm[i : i + batch_size]]
        eps = torch.randn((len(x), 1, d), generator=gen, dtype=xs.dtype, device=xs.device)
        log_px_z, log_pz, log_q0, log_det = model.log_weight_terms(x, eps)
        kl_part = log_pz - log_q0 + log_det  # a one-sample estimate of -KL(q(z_K|x) || p(z_K))
        lr, beta = schedule(step) if schedule is not None else (None, 1.0)
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        loss = -(log_px_z + beta * kl_part).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elbo_sum += (log_px_z + kl_part).detach().sum()
        step += 1
    return elbo_sum, step


def _optimizer(model: VAE, args: argparse.Namespace) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if args.weight_decay > 0 else torch.optim.Adam
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay}
    try:  # one fused kernel per step instead of a handful of ops per parameter tensor
        return cls(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # pragma: no cover - devices without a fused Adam
        return cls(model.parameters(), **kwargs)


def _bits_note(data: ImageData, likelihood: str) -> tuple[int | None, str | None]:
    """(discrete_bins for bits_per_dim, note), or (None, None) when bits/dim would mean nothing."""
    if likelihood == "gaussian":
        return DISCRETE_BINS, (f"density on [0, 1] data read as {DISCRETE_BINS} levels per pixel: "
                               f"(-log p(x) + D log {DISCRETE_BINS}) / (D ln 2)")
    if data.binary:
        return None, "binary data, a probability mass: -log p(x) / (D ln 2)"
    return None, None  # Bernoulli on non-binary data: not a probability, no bits/dim


@torch.no_grad()
def _figures(model: VAE, data: ImageData, *, S: int, chunk: int, seed: int, device,
             splits: tuple[str, ...] = ("train", "valid", "test")) -> dict:
    model = model.to(device).eval()
    figures: dict = {}
    for split in splits:  # each figure draws its noise from its own seeded generator: reproducible alone
        gen = torch.Generator(device=device).manual_seed(seed)
        rows = getattr(data, split)
        x = torch.as_tensor(rows, dtype=torch.float32, device=device)
        figures[f"{split}_elbo"] = (
            float(torch.cat([model.elbo(xb, ELBO_SAMPLES, gen) for xb in x.split(max(1, chunk // ELBO_SAMPLES))])
                  .double().mean()) if len(rows) else None)
    figures["elbo_samples"] = ELBO_SAMPLES
    x = torch.as_tensor(data.test, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ll = float(model.importance_weighted_bound(x, S, chunk, gen).double().mean())
    bins, note = _bits_note(data, model.config.likelihood)
    figures.update({
        "test_log_likelihood": ll,
        "log_likelihood_exact": False,
        "importance_samples": S,
        "test_bits_per_dim": None if note is None else bits_per_dim(ll, data.data_dim, discrete_bins=bins),
        "bits_per_dim_note": note,
    })
    return figures


@torch.no_grad()
def _plots(model: VAE, data: ImageData, history: dict[str, list[float]], kind: str, out: Path) -> None:
    plots.save_curves(history, out / "elbo.png", title=f"{kind}: ELBO per epoch", xlabel="epoch",
                      ylabel="nats / image")
    x = model.sample(64, torch.Generator().manual_seed(0))
    plots.save_image_grid(plots.as_images(x.clamp(0, 1).numpy(), data.pixel_shape), out / "samples.png",
                          "samples: E[x | z], z ~ N(0, I)", ncols=8)
    test = torch.as_tensor(data.test[:32], dtype=torch.float32)
    recon = model.reconstruct(test).clamp(0, 1)
    # rows alternate: up to 8 test images, then their reconstructions
    pairs, ncols = plots.paired_rows(plots.as_images(test.numpy(), data.pixel_shape),
                                     plots.as_images(recon.numpy(), data.pixel_shape), ncols=8)
    plots.save_image_grid(pairs, out / "reconstructions.png",
                          "test images (odd rows) and reconstructions (even rows)", ncols=ncols)


def build_model(ckpt: dict) -> VAE:
    model = VAE(VAEConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def evaluate(ckpt: dict, args: argparse.Namespace) -> dict:
    """Test figures of a fitted VAE: ELBO and importance-weighted log-likelihood with args.samples."""
    seed_everything(args.seed)
    device = resolve_device(getattr(args, "device", "cpu"))
    model = build_model(ckpt)
    meta = ckpt["meta"]
    data = reload_dataset(meta)
    figures = _figures(model, data, S=args.samples, chunk=getattr(args, "chunk", 50_000), seed=args.seed,
                       device=device, splits=("test",))
    return {
        "model": ckpt["kind"],
        "dataset": meta["dataset"],
        "n_test": len(data.test),
        "test_elbo": figures["test_elbo"],
        "elbo_samples": ELBO_SAMPLES,
        "test_log_likelihood": figures["test_log_likelihood"],
        "log_likelihood_exact": False,
        "importance_samples": args.samples,
        "test_bits_per_dim": figures["test_bits_per_dim"],
        "bits_per_dim_note": figures["bits_per_dim_note"],
        "latent_dim": model.config.latent_dim,
        "flows": model.config.flows,
    }

