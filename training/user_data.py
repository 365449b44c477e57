"""Loaders for the user's own images: IDX files (gzipped or not), .npy / .npz arrays and folders of image
files, each checked before any training, with a :class:`DataError` that names the file, says what is wrong
and what is expected.

Images come out as float64 [N, H, W] (grayscale) or [N, H, W, 3] (RGB, channels last) in [0, 1]. The
channels follow the data unless asked for: the channel count of every folder file is read (see
:func:`image_channels`), so that a mix is refused rather than silently merged when none is asked for.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_repository.card import CHANNELS
from model_repository.pixels import resize, to_float

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The smallest image side accepted (files, arrays and --image-size): the smallest images this project
# models and serves are scikit-learn's 8x8 digits. A smaller side is nearly always a mistake: an [N, D]
# array whose D is read as a tiny square, or an icon or tracking pixel in a folder that resizing would
# blow up into a blur that the model then learns as data.
MIN_SIDE = 8
# Pillow modes with one channel; "P" (palette) images count as one when every palette colour they use is gray.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> (numpy big-endian dtype, bytes per value).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset could not be loaded: the message names the file and what is wrong."""


def load_images(path: str | Path, *, image_size: tuple[int, int] | None = None,
                channels: int | None = None) -> np.ndarray:
    """Load images as float64 [N, H, W] (grayscale) or [N, H, W, 3] (RGB) in [0, 1] from an IDX file, a
    .npz/.npy file or a folder.

    Integer arrays are read as 0..255 pixels; float arrays must already lie in [0, 1]. Arrays are
    [N, H, W], [N, H, W, 1], [N, H, W, 3] (RGB) or square grayscale images flattened to [N, H*W]; IDX
    files alike. ``channels`` (1 or 3) converts the images to grayscale or RGB; None keeps the data's own
    (a folder mixing grayscale and colour files then fails). ``image_size`` (H, W) resizes folder images
    (the default is the first image's size). Every side must be at least MIN_SIDE. Anything else raises a
    DataError that names the file, what is wrong and what is expected.
    """
    path = Path(path)
    if channels not in (None, *CHANNELS):
        raise DataError(f"--channels {channels}: expected 1 (grayscale) or 3 (RGB)")
    if image_size is not None:
        _check_side(tuple(image_size), "--image-size")
    if path.is_dir():
        return _load_image_folder(path, image_size, channels)
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
    images = _to_unit_images(arr, path)
    if image_size is not None and tuple(image_size) != images.shape[1:3]:
        raise DataError(f"{path}: --image-size resizes the images of a folder only; this file holds "
                        f"{images.shape[1]}x{images.shape[2]} images (leave --image-size out, or resize the array)")
    return _array_channels(images, channels)


def _array_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """Array images [N, H, W] or [N, H, W, 3] converted to `channels` (None: as they are): RGB to gray by the
    ITU-R 601-2 luma that Pillow's "L" (and so the service) uses, gray repeated into the three channels."""
    if channels == 1 and images.ndim == 4:
        return images @ np.array([0.299, 0.587, 0.114])
    if channels == 3 and images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=3)
    return images


def _check_side(shape: tuple[int, int], what: str) -> None:
    if min(shape) < MIN_SIDE:
        raise DataError(f"{what}: images of {shape[0]}x{shape[1]} pixels are below the minimum size of "
                        f"{MIN_SIDE}x{MIN_SIDE} (height and width must each be at least {MIN_SIDE})")


def load_idx(path: str | Path) -> np.ndarray:
    """Read an MNIST-style IDX file (gzipped or not) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    dtype, shape, header = idx_header(raw, len(raw), path)
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def idx_header(head: bytes, size: int, path: str | Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header bytes) of an IDX file of `size` bytes from its first bytes `head` (the whole
    header: 4 + 4 * ndim bytes, at most 1,024), checked against the size."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (expected one of "
                        f"{', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)})")
    header = 4 + 4 * ndim
    if ndim == 0 or len(head) < header:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = struct.unpack(f">{ndim}I", head[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if size - header != expected:
        raise DataError(f"{path}: IDX header declares shape {shape} ({expected} bytes of data) "
                        f"but the file holds {size - header} bytes")
    return dtype, shape, header


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
    expected = ("expected images [N, H, W] or [N, H, W, 1] (grayscale), [N, H, W, 3] (RGB, channels last), or "
                "square grayscale images flattened to [N, H*W], of integers 0..255 or floats in [0, 1]")
    if arr.ndim == 2:
        side = int(round(np.sqrt(arr.shape[1])))
        if side * side != arr.shape[1]:
            raise DataError(f"{path}: a 2-D array must hold square images flattened to N x (H*W); got "
                            f"{arr.shape[1]} columns, which is not a square number (store non-square images "
                            "as [N, H, W])")
        arr = arr.reshape(len(arr), side, side)
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 4 and arr.shape[-1] == 4:
        raise DataError(f"{path}: RGBA images of shape {list(arr.shape)}; {expected} (drop or composite the alpha "
                        "channel, e.g. x[..., :3])")
    elif arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[-1] != 3:
        raise DataError(f"{path}: an array of shape {list(arr.shape)} looks channels-first; {expected} "
                        "(channels last: numpy.moveaxis(x, 1, -1))")
    if arr.ndim != 3 and not (arr.ndim == 4 and arr.shape[-1] == 3):
        raise DataError(f"{path}: an array of shape {list(arr.shape)}; {expected}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: the array holds no images (shape {list(arr.shape)}); {expected}")
    _check_side(arr.shape[1:3], str(path))
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 255:
            raise DataError(f"{path}: integer pixels must lie in 0..255, got {lo}..{hi} (scale 16-bit data "
                            "to 0..255, or store floats in [0, 1])")
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float64)
        if not np.isfinite(out).all():
            raise DataError(f"{path}: the array holds NaN or infinite values (expected floats in [0, 1])")
        if out.min() < 0.0 or out.max() > 1.0:
            raise DataError(f"{path}: float pixels must lie in [0, 1], got {out.min():g}..{out.max():g} "
                            "(divide 0..255 floats by 255, or store them as uint8)")
        return out
    raise DataError(f"{path}: unsupported array dtype {arr.dtype} (expected integers 0..255, floats in [0, 1] "
                    "or booleans)")


def image_channels(im) -> int:
    """1 for a grayscale Pillow image (a palette of grays included), 3 for a colour one."""
    if im.mode in _GRAY_MODES:
        return 1
    if im.mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        return 1 if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() else 3
    return 3


def _examples(files: list[Path], folder: Path, limit: int = 3) -> str:
    names = ", ".join(str(f.relative_to(folder)) for f in files[:limit])
    return names + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _load_image_folder(folder: Path, image_size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """Every image file under `folder` (sorted by path) as float64 [N, H, W] or [N, H, W, 3] in [0, 1].

    All files are checked before any pixel is used: unreadable files, files below MIN_SIDE and, unless
    `channels` says what to convert them to, a mix of grayscale and colour files are each reported with
    the files' names. Pixels are converted as the service converts uploads (model_repository/pixels.py:
    transparent pixels on white, 16-bit images scaled by 65535, luma for gray), so that a file is the same
    pixels in training and in serving.
    """
    everything = [p for p in folder.rglob("*") if p.is_file()]
    files = sorted(p for p in everything if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        found = f"it holds {len(everything)} other files" if everything else "it is empty"
        raise DataError(f"{folder}: no images found ({found}); expected image files ending in "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    opened: dict[Path, Image.Image] = {}
    unreadable, small, by_channels = [], [], {1: [], 3: []}
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()  # the pixels stay in memory once the file is closed
                if min(im.height, im.width) < MIN_SIDE:
                    small.append(f"{f.relative_to(folder)} ({im.height}x{im.width})")
                    continue
                by_channels[image_channels(im)].append(f)
                opened[f] = im
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            unreadable.append(f"{f.relative_to(folder)} ({type(e).__name__}: {str(e)[:120]})")
    if unreadable:
        raise DataError(f"{folder}: {len(unreadable)} of {len(files)} image files are not readable images: "
                        f"{'; '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''} (expected complete "
                        "PNG, JPEG, BMP, GIF, TIFF or WebP files; remove or replace them)")
    if small:
        raise DataError(f"{folder}: {len(small)} images are below the minimum size of {MIN_SIDE}x{MIN_SIDE} "
                        f"pixels: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''} (remove them)")
    gray, colour = by_channels[1], by_channels[3]
    if gray and colour and channels is None:
        raise DataError(
            f"{folder}: the folder mixes {len(gray)} grayscale images ({_examples(gray, folder)}) with "
            f"{len(colour)} colour images ({_examples(colour, folder)}); expected one kind. Pass --channels 3 to "
            "model colour (grayscale files repeated into RGB) or --channels 1 to model grayscale (colour "
            "converted by luma), or convert the colour files to grayscale (e.g. Pillow's Image.convert('L')), "
            "or remove the odd ones out")
    target = channels or (3 if colour else 1)
    size = tuple(image_size) if image_size is not None else None
    images = []
    for f in files:
        x = to_float(opened.pop(f), target).astype(np.float64)
        size = size or x.shape[:2]  # the first image's size by default
        if x.shape[:2] != size:
            # Lanczos on float pixels, then clipped: what the service does to uploads of another size
            x = resize(x, size).astype(np.float64)
        images.append(x)
    return np.stack(images)
