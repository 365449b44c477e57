"""PNG plots written next to every fitted model: curves over training and grids of images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images [N, H, W] into one array, `pad` background pixels between tiles."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape [N, H, W], got {images.shape}")
    n, h, w = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.zeros((nrows * (h + pad) - pad, ncols * (w + pad) - pad), dtype=images.dtype)
    for k, im in enumerate(images):
        r, c = divmod(k, ncols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = im
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, title: str, *, ncols: int | None = None,
                    cmap: str = "gray", symmetric: bool = False) -> Path:
    """Save images [N, H, W] as one titled PNG; `symmetric` centres the colour map on 0 (signed images)."""
    plt = _pyplot()
    grid = image_grid(images, ncols)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / max(grid.shape[1], 1) + 0.4))
    if symmetric:
        lim = float(np.abs(grid).max()) or 1.0
        ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    else:
        ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_curves(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str, xlabel: str,
                ylabel: str, reference: Mapping[str, float] | None = None) -> Path:
    """Line plot of named series against their index (+1), with optional horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in curves.items():
        if len(ys):
            ax.plot(np.arange(1, len(ys) + 1), ys, label=label)
    for label, y in (reference or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, (1, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color="gray")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
