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


def as_images(rows: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Flattened rows [N, D] (row-major, as the models see them) -> images [N, *image_shape]."""
    rows = np.asarray(rows)
    return rows.reshape(len(rows), *image_shape)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images [N, H, W] (or [N, H, W, C]) into one array, `pad` background pixels between tiles.

    Any N >= 1 works: at most `ncols` tiles a row (default: a square-ish grid), the last row left short.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"expected one or more images of shape [N, H, W] or [N, H, W, C], got {images.shape}")
    n, h, w = images.shape[:3]
    ncols = min(ncols or int(np.ceil(np.sqrt(n))), n)
    nrows = int(np.ceil(n / ncols))
    grid = np.zeros((nrows * (h + pad) - pad, ncols * (w + pad) - pad, *images.shape[3:]), dtype=images.dtype)
    for k, im in enumerate(images):
        r, c = divmod(k, ncols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = im
    return grid


def paired_rows(first: np.ndarray, second: np.ndarray, ncols: int = 8) -> tuple[np.ndarray, int]:
    """Interleave two equally long image stacks row by row: `ncols` of `first`, then the same `ncols` of
    `second` (e.g. test images over their reconstructions), for any N >= 1.

    Returns the images for :func:`image_grid` and the number of columns to tile them with; a short last
    row is filled with blank (zero) tiles so that every image sits right above its partner.
    """
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or len(first) == 0:
        raise ValueError(f"expected two non-empty image stacks of one shape, got {first.shape} and {second.shape}")
    n = len(first)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    blank = np.zeros((nrows * ncols - n, *first.shape[1:]), dtype=first.dtype)
    a = np.concatenate([first, blank]).reshape(nrows, 1, ncols, *first.shape[1:])
    b = np.concatenate([second, blank]).reshape(nrows, 1, ncols, *first.shape[1:])
    return np.concatenate([a, b], axis=1).reshape(-1, *first.shape[1:]), ncols


def save_image_grid(images: np.ndarray, path: str | Path, title: str, *, ncols: int | None = None,
                    cmap: str = "gray", symmetric: bool = False) -> Path:
    """Save images [N, H, W] (or [N, H, W, 3]) as one titled PNG; `symmetric` shows signed images centred on 0:
    a red-blue colour map for one channel; for RGB, 0 as mid-gray and each channel v as 0.5 + v / (2 max|v|)."""
    plt = _pyplot()
    grid = image_grid(images, ncols)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / max(grid.shape[1], 1) + 0.4))
    if symmetric:
        lim = float(np.abs(grid).max()) or 1.0
        if grid.ndim == 3:
            ax.imshow(0.5 + grid / (2 * lim), interpolation="nearest")
        else:
            ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    elif grid.ndim == 3:
        ax.imshow(grid, interpolation="nearest")  # RGB in [0, 1]: no colour map
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
