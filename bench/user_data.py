"""Your own images, in colour and in gray: test bits/dim of PPCA, the VAE and the flow-VAE on 16x16 patches
of scikit-learn's two sample photos, and the fit times.

    .venv/bin/python -m bench.user_data [--no-save] [--epochs 200] [--work runs/bench-user-data]

Data: the two colour photos that scikit-learn ships (`sklearn.datasets.load_sample_images()`: china.jpg and
flower.jpg, 427 x 640 pixels each), cut into non-overlapping 16 x 16 patches on a grid from the top-left
corner (26 x 40 = 1,040 per photo, 2,080 in all), written as RGB PNG files into one folder, as a user's
folder of images would be. Every model is fitted on that folder with `python -m training fit` and the
defaults of user data: a seeded 20 % test split (416 patches; neighbouring patches of one photo can fall
on both sides), then 10 % of the remaining rows for validation (166), 1,498 training rows. The colour
models take the data's channels (3, D = 768); the grayscale ones the same folder with `--channels 1`
(ITU-R 601-2 luma, D = 256), so both see the same patches in the same split.

Figures: test log-likelihood in nats per patch (exact for PPCA; the importance-weighted bound with
--eval-samples for the VAEs) and bits/dim = (-log p(x) + D log 256) / (D ln 2), the density read as 256
levels per pixel and channel. Fit time: the training loop (`seconds` in metrics.json) and the wall time of
the whole `fit` command (data loading, evaluation, plots) on this machine. Also writes
docs/user_data_colour.png: test patches, their reconstructions and samples of the colour models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import publish, table
from training.train_vae import KIND_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
PATCH = 16
PLOT = ROOT / "docs" / "user_data_colour.png"


def write_patches(folder: Path) -> int:
    """The 16 x 16 patches of scikit-learn's sample photos as PNG files in `folder`; returns their number."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for photo, fname in zip(load_sample_images().images, ("china", "flower"), strict=True):
        H, W = photo.shape[0] // PATCH, photo.shape[1] // PATCH
        for i in range(H):
            for j in range(W):
                patch = photo[i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH]
                Image.fromarray(patch).save(folder / f"{fname}_{i:02d}_{j:02d}.png")
                n += 1
    return n


def fits(epochs: int, eval_samples: int) -> dict[str, list[str]]:
    vae = ["--epochs", str(epochs), "--warmup-epochs", str(max(1, epochs // 6)), "--eval-samples", str(eval_samples)]
    return {
        "ppca": ["--model", "ppca", "--method", "closed-form", "--latent-dim", "32"],
        "vae": ["--model", "vae", *vae],
        "flow-vae": ["--model", "flow-vae", *vae],
    }


def fit(folder: Path, out: Path, args: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "training", "fit", *args, "--dataset", str(folder), "--out", str(out), "--quiet",
           "--no-export"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start


def discretised_bits_per_dim(run: Path, S: int, seed: int = 0) -> float:
    """Test bits/dim of a fitted Gaussian VAE read as a per-channel discretised likelihood, evaluation only.

    The same model and the same kind of bound (importance-weighted, S samples), with log N(x; mean, var) of
    each value replaced by the log of the Gaussian's mass on the value's bin [x - 1/510, x + 1/510], the two
    edge bins (0 and 255) stretched to -inf and +inf: a probability mass, so bits/dim = -log P(x) / (D ln 2).
    """
    import math

    import torch

    from training.common import load_checkpoint
    from training.data import reload_dataset
    from training.drivers import driver_for
    from training.vae import LOG_2PI

    ckpt = load_checkpoint(run)
    model = driver_for(ckpt["kind"]).build_model(ckpt)
    x = torch.as_tensor(reload_dataset(ckpt["meta"]).test, dtype=torch.float64)
    model = model.double()
    half = 0.5 / 255
    gen = torch.Generator().manual_seed(seed)
    bounds = []
    with torch.no_grad():
        for xb in x.split(32):
            eps = torch.randn((len(xb), S, model.config.latent_dim), generator=gen, dtype=torch.float64)
            mean, log_var, params = model.encode(xb)
            z0 = mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps
            zK, log_det = model.flow(z0, params)
            log_pz = -0.5 * (zK.pow(2) + LOG_2PI).sum(-1)
            log_q0 = -0.5 * (eps.pow(2) + log_var.unsqueeze(1) + LOG_2PI).sum(-1)
            m, lv = model.decode(zK)
            std = torch.exp(0.5 * lv)
            xe = xb.unsqueeze(1).expand_as(m)
            a = (torch.where(xe <= half, -math.inf, xe - half) - m) / std
            b = (torch.where(xe >= 1 - half, math.inf, xe + half) - m) / std
            # log(Phi(b) - Phi(a)) in log space, on the side of the mean where the bin lies (mirrored when above):
            # in a far tail both Phi underflow, and near 1 their difference cancels
            flip = (a + b) > 0
            a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
            lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
            log_px_z = (lb + torch.log(-torch.expm1(la - lb))).sum(-1)
            lw = log_px_z + log_pz - log_q0 + log_det
            bounds.append(torch.logsumexp(lw, 1) - math.log(S))
    return float(-torch.cat(bounds).mean() / (x.shape[1] * math.log(2)))


def plot(runs: Path, path: Path) -> None:
    """Test patches over their reconstructions, and samples E[x | z], z ~ N(0, I), of each colour model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from training.common import load_checkpoint
    from training.data import reload_dataset
    from training.drivers import driver_for
    from training.plots import image_grid

    n = 12
    rows, labels = [], []
    for kind in ("ppca", "vae", "flow-vae"):
        ckpt = load_checkpoint(runs / f"colour-{kind}")
        model = driver_for(kind).build_model(ckpt)
        data = reload_dataset(ckpt["meta"])
        test = torch.as_tensor(data.test[:n])
        with torch.no_grad():
            if kind == "ppca":
                recon = model.mu + model.posterior(test.double())[0] @ model.W.T
                samples = model.mu + torch.randn(n, model.config.latent_dim, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64) @ model.W.T
            else:
                recon = model.reconstruct(test.float())
                samples = model.sample(n, torch.Generator().manual_seed(0))
        if not rows:
            rows.append(test.numpy())
            labels.append("test patches")
        rows += [recon.numpy(), samples.numpy()]
        labels += [f"{kind}: reconstructions", f"{kind}: samples"]
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 0.62 * len(rows)))
    for ax, row, label in zip(axes, rows, labels, strict=True):
        ax.imshow(image_grid(np.clip(row, 0, 1).reshape(n, PATCH, PATCH, 3), ncols=n), interpolation="nearest")
        ax.set_title(label, fontsize=7, loc="left", pad=2)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-user-data")
    p.add_argument("--epochs", type=int, default=200, help="VAE epochs (warm-up: a sixth of them)")
    p.add_argument("--eval-samples", type=int, default=100, help="S of the test importance-weighted bound")
    p.add_argument("--no-save", action="store_true", help="print only: no docs/benchmarks.md section, no plot")
    args = p.parse_args(argv)

    folder = args.work / "patches"
    n_patches = write_patches(folder)
    results = []
    for channels in (3, 1):
        for kind, fit_args in fits(args.epochs, args.eval_samples).items():
            tag = f"{'colour' if channels == 3 else 'gray'}-{kind}"
            extra = [] if channels == 3 else ["--channels", "1"]  # colour: the data's own channels
            metrics, wall = fit(folder, args.work / tag, [*fit_args, *extra])
            results.append((channels, kind, metrics, wall))
    rows = []
    for channels, kind, m, wall in results:
        d = m["dataset"]
        D = d["image_shape"][0] * d["image_shape"][1] * d["channels"]
        assert d["channels"] == channels, d
        epochs = f"{m['epochs']} (best {m['best_epoch']})" if "epochs" in m else "closed form"
        run = args.work / f"{'colour' if channels == 3 else 'gray'}-{kind}"
        discrete = "n/a" if kind == "ppca" else f"{discretised_bits_per_dim(run, args.eval_samples):.4f}"
        rows.append(["RGB" if channels == 3 else "gray", kind, D, m["test_log_likelihood"], m["test_bits_per_dim"],
                     discrete, epochs, f"{m['seconds']:.1f}", f"{wall:.1f}"])
    d = results[0][2]["dataset"]
    flows = KIND_DEFAULTS["flow-vae"]["flows"]  # the recipe the fits took
    body = (
        f"Data: {n_patches} non-overlapping 16 x 16 patches of scikit-learn's two sample photos (china.jpg, "
        "flower.jpg; `load_sample_images()`), written as RGB PNG files into one folder; the default split of user "
        f"data: {d['n_test']} test patches (seeded 20 %), {d['n_valid']} validation and {d['n_train']} training "
        "patches. Colour: the folder's own channels (3); gray: the same folder with `--channels 1` (luma), the "
        "same patches in the same split.\n\n"
        + table(["data", "model", "D", "test log-lik (nats/patch)", "test bits/dim",
                 "bits/dim, same model discretised", "epochs", "training s", "fit command s"], rows)
        + "\n\n"
        f"PPCA: closed form (exact ML), d = 32, exact log-likelihood. VAE and flow-VAE: the defaults (d = 40, "
        f"hidden 512 512, Gaussian decoder with the variance floor 1e-3, flow-VAE {flows} amortized planar flows, 1 "
        f"torch thread) with --epochs {args.epochs} --warmup-epochs {max(1, args.epochs // 6)}, the best "
        f"validation epoch kept; their log-likelihood is the importance-weighted bound with S = {args.eval_samples}. "
        "bits/dim = (-log p(x) + D log 256) / (D ln 2). \"Same model discretised\": the same fitted VAE "
        "evaluated (not trained) with a per-channel discretised Gaussian, each value's bin [x - 1/510, x + 1/510] "
        "with the edge bins 0 and 255 stretched to infinity, the same S; a probability mass, -log P(x) / (D ln 2) "
        "(n/a for PPCA, whose Gaussian is not per pixel). Training s: the fit loop; fit command s: the whole "
        f"`python -m training fit` (loading {n_patches} PNGs, evaluation, plots) on {os.cpu_count()} cores. "
        "Plot of test patches, reconstructions and samples: docs/user_data_colour.png."
    )
    if not args.no_save:
        plot(args.work, PLOT)
    publish("Your own images: colour and gray patches of scikit-learn's sample photos", body, module="bench.user_data",
            save=not args.no_save)


if __name__ == "__main__":
    main()
