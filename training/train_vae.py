"""Driver for `python -m training fit --model vae|flow-vae`: train by the reparametrized ELBO with Adam,
keep the parameters with the best validation ELBO, then write the checkpoint, `metrics.json` (ELBOs and
the test importance-weighted log-likelihood) and plots. The model lives in :mod:`training.vae`.

    python -m training fit --model flow-vae --dataset mnist5k-bin --out runs/flow-vae

Bernoulli models on binary data whose continuous intensities are known (`mnist5k-bin`) see a fresh
stochastic binarization of the training rows every epoch (each pixel is 1 with probability equal to its
intensity, as :func:`training.data.binarize`); validation and test rows stay the fixed binarized rows.

Under torchrun the model trains in DistributedDataParallel by global batches (training/vae_epoch.py), each
rank evaluates its own validation and test rows and the figures are reduced as sums and counts, so every
rank sees the same validation ELBO and stops at the same epoch; rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from training import common, plots, progress
from training.common import METRICS, bits_figures, run_meta, save_checkpoint, seed_everything, write_json
from training.config import FitJob, option
from training.data import ImageData
from training.distributed import Dist, single
from training.schedules import KL_SCHEDULES, LR_SCHEDULES, Schedule
from training.shards import local, reopen_dataset, row_fetcher
from training.vae import ACTIVATIONS, FLOW_TYPES, LAYERS, LIKELIHOODS, VAE, VAEConfig
from training.vae_epoch import OBJECTIVES, GlobalBatches, LogWeightTerms, make_optimizer, objective_rows, train_epoch

# Each kind's recipe where the kinds differ (a setting left None takes its kind's value), chosen on validation figures
# (docs/benchmarks.md, "VAE fit options (issue 20)") within scripts/run's budget: all three default models served in
# 11 minutes of a fresh clone, two fits at a time. bf16 cost the plain VAE a seed's bound; 20 flows were unsteady
# without the learning-rate warm-up; the longer KL warm-up gave the flows 0.4-0.5 nats (the VAE -0.13).
_SHARED = {"objective": "iwae", "k": 4}
KIND_DEFAULTS: dict[str, dict[str, object]] = {
    "vae": dict(_SHARED, flows=0, layer="plain", epochs=420, precision="fp32", warmup_epochs=100.0,
                lr_warmup_epochs=0.0),
    "flow-vae": dict(_SHARED, flows=20, layer="gated", epochs=370, precision="bf16", warmup_epochs=150.0,
                     lr_warmup_epochs=10.0),
}
# `--precision`: the dtype of the encoder's and decoder's matrix products in training steps (None: float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
ELBO_SAMPLES = 10  # S for the reported ELBOs (train / valid / test): a lower-variance MC estimate
VALID_SAMPLES = 4  # S per validation row for model selection each epoch (the same eps every epoch)


def _by_kind(name: str) -> str:
    return ", ".join(f"{recipe[name]} for {kind}" for kind, recipe in KIND_DEFAULTS.items())


@dataclass(frozen=True)
class VAEFit:
    """`fit --model vae|flow-vae` settings. The architecture's defaults are the model's own (VAEConfig in
    training/vae.py, with their reasons); the training defaults give the quality models of docs/benchmarks.md."""

    latent_dim: int = option(VAEConfig.latent_dim, "d, number of latent dimensions")
    hidden: tuple[int, ...] = option(VAEConfig.encoder_hidden, "encoder hidden layer sizes")
    decoder_hidden: tuple[int, ...] | None = option(None, "decoder hidden layer sizes (default: the encoder's, "
                                                    "reversed)", type=int, nargs="+")
    activation: str = option(VAEConfig.activation, "hidden-layer activation (none: for --layer gated)",
                             choices=sorted(ACTIVATIONS))
    flows: int | None = option(None, "K planar flows (default: {})".format(_by_kind("flows")), type=int)
    flow_type: str = option(VAEConfig.flow_type, "amortized: flow parameters per image from the encoder; global: "
                            "shared parameters", choices=FLOW_TYPES)
    layer: str | None = option(None, "hidden layers. plain: Linear + activation; residual: h + act(Linear(h)) where "
                               "the width stays; gated: act(Linear(h)) * sigmoid(Linear_g(h)), the VampPrior code's "
                               "GatedDense (there with --activation none). Default: {}".format(_by_kind("layer")),
                               choices=LAYERS)
    likelihood: str | None = option(None, "p(x|z) (default: bernoulli for binary data, gaussian otherwise)",
                                    choices=LIKELIHOODS)
    var_floor: float = option(VAEConfig.var_floor, "gaussian: lower bound on the pixel variance")
    epochs: int | None = option(None, "epochs to train (by kind: {})".format(_by_kind("epochs")), type=int)
    batch_size: int = option(100, "rows per Adam step (the peers' batch size); under torchrun the global batch, "
                             "a multiple of the ranks")
    lr: float = option(1e-3, "Adam learning rate (Adam's usual rate; the cosine schedule decays it)")
    lr_schedule: str = option("cosine", "cosine: decay the learning rate to 0 at --epochs (per step; from the end "
                              "of --lr-warmup-epochs)", choices=LR_SCHEDULES)
    lr_warmup_epochs: float | None = option(None, "learning-rate warm-up: the rate rises linearly from lr / steps to "
                                            "--lr over these epochs (per step), then follows --lr-schedule. 0: none. "
                                            "Default: {}".format(_by_kind("lr_warmup_epochs")), type=float)
    weight_decay: float = option(0.1, "decoupled weight decay (AdamW; 0 gives Adam): the main remedy against "
                                 "overfitting 3,600 rows")
    warmup_epochs: float | None = option(None, "KL warm-up: the weight beta of log p(z) - log q(z|x) rises from 0 "
                                         "to 1 over these epochs (fewer inactive latent units). Default by kind: {} "
                                         "(the quality models')".format(_by_kind("warmup_epochs")),
                                         type=float)
    kl_schedule: str = option("linear", "shape of the KL warm-up: linear, or cosine (beta = (1 - cos(pi t)) / 2: "
                              "slower at both ends). linear is the quality models'", choices=KL_SCHEDULES)
    objective: str | None = option(None, "training bound per row over --k samples. elbo: the mean of the k log w "
                                   "(k > 1: a lower-variance gradient); iwae: logsumexp - log k, the importance-"
                                   "weighted bound (Burda et al. 2016), tighter as k grows. Default: {}".format(
                                       _by_kind("objective")), choices=OBJECTIVES)
    k: int | None = option(None, "samples per training row for --objective (each step costs about k times more in "
                           "the decoder). Default: {}".format(_by_kind("k")), type=int)
    patience: int = option(0, "stop after this many epochs without a better validation ELBO (IW bound with "
                           "iwae). 0: never, as the quality models: under the cosine schedule the best epoch is near "
                           "the end, and the validation curve can stall for 30 epochs or more while the rate is high")
    dynamic_binarization: bool | None = option(None, "re-binarize the continuous training rows each epoch (default: "
                                               "on when they exist: less overfitting than one fixed binarization)",
                                               action=argparse.BooleanOptionalAction)
    eval_samples: int = option(1000, "S for the validation and test importance-weighted log-likelihoods in "
                               "metrics.json (the benchmark's S)")
    chunk: int = option(50_000, "(row, sample) pairs per pass when evaluating (bounds the memory of a pass)")
    precision: str | None = option(None, "training steps' encoder and decoder products: fp32, or bf16 (bfloat16 "
                                   "under autocast, about half the matrix time on CPUs with AVX512-BF16 or AMX, and "
                                   "on GPUs; parameters, optimizer, flows, densities, validation and evaluation stay "
                                   "float32). Default: {}".format(_by_kind("precision")), choices=tuple(PRECISIONS))
    threads: int = option(1, "torch CPU threads (0: torch's default). At batch 100 a second thread gains little, and "
                          "on a busy machine OpenMP threads waiting on each other slow training down tens of times "
                          "(see docs/benchmarks.md)")
    time_limit: float | None = option(None, "stop training after this many seconds (the best epoch so far is "
                                      "kept)", type=float)


Options = VAEFit


def for_kind(fit: VAEFit, kind: str) -> VAEFit:
    """`fit` with every setting left None that the kind's recipe sets (KIND_DEFAULTS) set to its kind's value."""
    return replace(fit, **{name: value for name, value in KIND_DEFAULTS[kind].items() if getattr(fit, name) is None})


def _config(kind: str, fit: VAEFit, data: ImageData) -> VAEConfig:
    """The model's config from settings already resolved for `kind` (`for_kind`, done once by `fit`)."""
    flows = fit.flows
    if kind == "vae" and flows != 0:
        raise ValueError(f"--model vae has no flows, got --flows {flows}; use --model flow-vae")
    if kind == "flow-vae" and flows < 1:
        raise ValueError(f"--model flow-vae needs --flows >= 1, got {flows}; use --model vae for none")
    if fit.k < 1:
        raise ValueError(f"--k is the number of samples per training row and must be >= 1, got {fit.k}")
    if fit.lr_warmup_epochs < 0 or fit.warmup_epochs < 0:
        raise ValueError(f"warm-up epochs must be >= 0, got --lr-warmup-epochs {fit.lr_warmup_epochs}, "
                         f"--warmup-epochs {fit.warmup_epochs}")
    likelihood = fit.likelihood or ("bernoulli" if data.binary else "gaussian")
    return VAEConfig(
        data_dim=data.data_dim, latent_dim=fit.latent_dim, encoder_hidden=tuple(fit.hidden),
        decoder_hidden=tuple(fit.decoder_hidden or fit.hidden[::-1]), activation=fit.activation,
        likelihood=likelihood, var_floor=fit.var_floor, flows=flows, flow_type=fit.flow_type, layer=fit.layer,
    )


def fit(job: FitJob, data: ImageData, out: Path, dist: Dist | None = None) -> dict:
    kind, run = job.kind, job.run
    args: VAEFit = for_kind(job.model, kind)
    if len(data.valid) == 0:
        raise ValueError("vae training selects its epoch on validation rows: use --valid-fraction > 0")
    dist = dist or single(run.device)
    out = Path(out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    device = dist.device
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(kind, args, data)
    model = VAE(cfg).to(device)
    model.mlp_dtype = PRECISIONS[args.precision]
    dynamic = args.dynamic_binarization
    if dynamic is None:
        dynamic = data.train_probs is not None and cfg.likelihood == "bernoulli"
    if dynamic and data.train_probs is None:
        raise ValueError(f"--dynamic-binarization needs continuous training intensities, which dataset "
                         f"{data.name!r} does not have (only mnist5k-bin does)")

    f32 = dict(dtype=torch.float32, device=device)
    fetch = row_fetcher(data.train_probs if dynamic else data.train, device)
    valid_rows, x_valid = local(data.valid, dist)
    x_valid = torch.as_tensor(x_valid, **f32)
    gen = torch.Generator(device=device).manual_seed(run.seed)  # in the same state on every rank
    # Every rank draws the noise of all validation rows and keeps its own: the one-process figures.
    valid_eps = torch.randn((len(data.valid), VALID_SAMPLES, cfg.latent_dim), generator=gen, **f32)[valid_rows]

    n, B = len(data.train), args.batch_size
    batches = GlobalBatches(n, B, dist, run.seed)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    kl_warmup = args.warmup_epochs
    forward = dist.wrap(LogWeightTerms(model))
    opt = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    schedule = Schedule(lr=args.lr, lr_schedule=args.lr_schedule, total_steps=total_steps,
                        lr_warmup_steps=args.lr_warmup_epochs * steps_per_epoch,
                        kl_warmup_steps=kl_warmup * steps_per_epoch, kl_schedule=args.kl_schedule)
    # The epoch is chosen on the training bound at beta = 1 over the validation rows' fixed samples.
    valid_name = "valid ELBO" if args.objective == "elbo" else f"valid IW bound (S={VALID_SAMPLES})"
    history: dict[str, list[float]] = {"train ELBO": [], valid_name: []}
    best = {"elbo": -math.inf, "epoch": 0, "state": None}
    step, epoch = 0, 0
    start = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc=kind, unit="epoch", disable=run.quiet or not dist.is_main)
    report = progress.current()  # to build-defaults, when it started this fit
    for epoch in bar:
        model.train()
        elbo_sum, step = train_epoch(forward, opt, fetch, batches, epoch, latent_dim=cfg.latent_dim, gen=gen,
                                     binarize=dynamic, step=step, schedule=schedule, objective=args.objective,
                                     k=args.k)
        model.eval()
        with torch.no_grad():
            valid_sum = objective_rows(model.log_weights(x_valid, valid_eps), args.objective).double().sum()
        elbo_sum, valid_sum = dist.sum(elbo_sum, valid_sum)  # one all-reduce per epoch: sums over all rows
        train_elbo, valid_elbo = float(elbo_sum) / n, float(valid_sum) / len(data.valid)
        if not math.isfinite(train_elbo):
            raise FloatingPointError(
                f"{kind} training diverged in epoch {epoch}: the training ELBO is {train_elbo} "
                f"(learning rate {args.lr}); lower --lr or check the data for NaN/inf")
        history["train ELBO"].append(train_elbo)
        history[valid_name].append(valid_elbo)
        if valid_elbo > best["elbo"]:
            best = {"elbo": valid_elbo, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{-train_elbo:.2f}", valid_elbo=f"{valid_elbo:.2f}", best=f"{best['elbo']:.2f}",
                        s_per_epoch=f"{elapsed / epoch:.2f}", refresh=False)
        report.step(epoch, args.epochs, "epoch", **{"train ELBO": train_elbo, valid_name: valid_elbo})
        if args.patience and epoch - best["epoch"] >= args.patience:
            break
        if args.time_limit is not None and dist.decide(elapsed >= args.time_limit):  # rank 0's clock
            break
    seconds = time.perf_counter() - start
    if best["state"] is None:
        raise FloatingPointError(f"{kind}: no epoch gave a finite validation ELBO")
    model.load_state_dict(best["state"])
    model = model.eval()

    settings = {
        "model": kind, "latent_dim": cfg.latent_dim, "hidden": list(cfg.encoder_hidden),
        "decoder_hidden": list(cfg.decoder_hidden), "activation": cfg.activation, "layer": cfg.layer,
        "flows": cfg.flows, "flow_type": cfg.flow_type if cfg.flows else None, "likelihood": cfg.likelihood,
        "epochs": args.epochs, "epochs_run": epoch, "best_epoch": best["epoch"], "batch_size": B,
        "lr": args.lr, "lr_schedule": args.lr_schedule, "lr_warmup_epochs": args.lr_warmup_epochs,
        "weight_decay": args.weight_decay, "warmup_epochs": kl_warmup, "kl_schedule": args.kl_schedule,
        "objective": args.objective, "k": args.k, "precision": args.precision, "patience": args.patience,
        "dynamic_binarization": dynamic,
        "optimizer": type(opt).__name__, "seed": run.seed, "device": str(device), **dist.record(),
        "threads": torch.get_num_threads(), "seconds": seconds,
    }
    meta = run_meta(job.data, data, settings, history)
    config = asdict(cfg)
    config["encoder_hidden"], config["decoder_hidden"] = list(cfg.encoder_hidden), list(cfg.decoder_hidden)
    if dist.is_main:
        save_checkpoint(out, kind=kind, config=config,
                        state_dict={k: v.cpu() for k, v in model.state_dict().items()}, meta=meta)
    report.phase("evaluating")
    eval_start = time.perf_counter()
    figures = _figures(model, data, S=args.eval_samples, chunk=args.chunk, seed=run.seed, device=device, dist=dist)
    metrics = {
        "model": kind,
        "dataset": data.summary(),
        "epochs": epoch,
        "best_epoch": best["epoch"],
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(epoch, 1),
        "eval_seconds": time.perf_counter() - eval_start,
        **dist.record(),
        **figures,
    }
    if dist.is_main:
        write_json(out / METRICS, metrics)
        _plots(model.cpu(), data, history, kind, out)
    return metrics


@torch.no_grad()
def _figures(model: VAE, data: ImageData, *, S: int, chunk: int, seed: int, device,
             splits: tuple[str, ...] = ("train", "valid", "test"), dist: Dist | None = None) -> dict:
    """ELBOs per split and the validation (when in `splits`: to choose recipes on) and test importance-weighted
    bounds: over ranks, each rank's own rows with its own noise (rank 0's is the one-process noise), reduced as
    sums and counts."""
    dist = dist or Dist(device=torch.device(device))
    model = model.to(device).eval()

    def mean(split: str, per_row) -> float | None:  # each figure draws its noise from its own seeded generator
        gen = torch.Generator(device=device).manual_seed(dist.rank_seed(seed))
        x = torch.as_tensor(local(getattr(data, split), dist)[1], dtype=torch.float32, device=device)
        total = per_row(x, gen).double().sum() if len(x) else 0.0
        (total,) = dist.sum(total)
        n = len(getattr(data, split))
        return float(total) / n if n else None

    figures: dict = {}
    for split in splits:
        figures[f"{split}_elbo"] = mean(split, lambda x, gen: torch.cat(
            [model.elbo(xb, ELBO_SAMPLES, gen) for xb in x.split(max(1, chunk // ELBO_SAMPLES))]))
    figures["elbo_samples"] = ELBO_SAMPLES
    for split in ("valid", "test") if "valid" in splits else ("test",):
        figures[f"{split}_log_likelihood"] = mean(split, lambda x, g: model.importance_weighted_bound(x, S, chunk, g))
    ll = figures["test_log_likelihood"]
    bpd, note = bits_figures(ll, data, model.config.likelihood)
    figures.update({
        "test_log_likelihood": ll,
        "log_likelihood_exact": False,
        "importance_samples": S,
        "test_bits_per_dim": bpd,
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


def evaluate(ckpt: dict, *, samples: int, seed: int, device: str) -> dict:
    """Test figures of a fitted VAE: ELBO and importance-weighted log-likelihood with `samples` samples."""
    seed_everything(seed)
    model = build_model(ckpt)
    meta = ckpt["meta"]
    data = reopen_dataset(meta)
    figures = _figures(model, data, S=samples, chunk=VAEFit.chunk, seed=seed, device=common.resolve_device(device),
                       splits=("test",))
    return {
        "model": ckpt["kind"],
        "dataset": meta["dataset"],
        "n_test": len(data.test),
        "test_elbo": figures["test_elbo"],
        "elbo_samples": ELBO_SAMPLES,
        "test_log_likelihood": figures["test_log_likelihood"],
        "log_likelihood_exact": False,
        "importance_samples": samples,
        "test_bits_per_dim": figures["test_bits_per_dim"],
        "bits_per_dim_note": figures["bits_per_dim_note"],
        "latent_dim": model.config.latent_dim,
        "flows": model.config.flows,
    }

