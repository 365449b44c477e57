"""Pillow images -> float32 intensities in [0, 1] with a model's channels, and resizing: the one conversion
of pixels, used by the service for uploads and by training for image folders, so that a file is the same
pixels in training and in serving.

Grayscale is ITU-R 601-2 luma (Pillow's "L"); colour is Pillow's "RGB", a grayscale image repeated in the
three channels. Transparent pixels are composited onto white, as a viewer shows them; 16- and 32-bit images
keep their precision, scaled by their type's range.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Pillow modes with one channel (LA and La: one channel and alpha).
_ONE_CHANNEL_MODES = ("1", "L", "LA", "La", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_float_gray(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> float32 [H, W] in [0, 1]; training reads image folders with it too (one conversion).

    Integer samples are divided by their type's largest value (65535 for 16 bits, 2**31 - 1 or 2**32 - 1
    for 32), never by the image's own maximum: a dim 16-bit image stays dim. Float samples ("F": 32-bit
    float TIFF) are intensities already; they are clipped to [0, 1], NaN read as 0.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        top = 32767.0 if mode.endswith("S") else 65535.0
        return np.clip(np.asarray(img, dtype=np.float64) / top, 0, 1).astype(np.float32)
    if mode == "I":
        return np.clip(np.asarray(img, dtype=np.float64) / _int_range(img), 0, 1).astype(np.float32)
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(a, 0, 1).astype(np.float32)
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    return np.asarray(_on_white(img).convert("L"), dtype=np.float32) / 255.0


def to_float_rgb(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> float32 [H, W, 3] in [0, 1], for colour models (training reads folders with it too).

    One-channel images (16- and 32-bit ones included) are :func:`to_float_gray` repeated in the three
    channels, as Pillow's convert("RGB") repeats "L"; any other mode is Pillow's "RGB" of the image,
    transparent pixels composited onto white first.
    """
    if img.mode in _ONE_CHANNEL_MODES or img.mode.startswith("I;16"):
        return np.repeat(to_float_gray(img)[:, :, None], 3, axis=2)
    return np.asarray(_on_white(img).convert("RGB"), dtype=np.float32) / 255.0


def to_float(img: Image.Image, channels: int) -> np.ndarray:
    """A decoded Pillow image -> float32 [H, W] (channels = 1) or [H, W, 3] (channels = 3) in [0, 1]."""
    return to_float_gray(img) if channels == 1 else to_float_rgb(img)


def _on_white(img: Image.Image) -> Image.Image:
    """`img` with its transparent pixels composited onto white (RGBA), or `img` itself when it has no alpha."""
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def as_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Gray [H, W] pixels as the `channels` a model takes: [H, W] for 1, repeated into [H, W, 3] for 3
    (what Pillow's convert("RGB") does to a grayscale image); [H, W, 3] pixels pass as they are."""
    if channels == 3 and pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


def _int_range(img: Image.Image) -> float:
    """The largest value of the integer type behind a mode "I" image (32-bit signed samples in Pillow).

    TIFF says its sample type (BitsPerSample 258, SampleFormat 339: 1 unsigned, 2 signed); any other file
    that Pillow gives this mode (16-bit PNG in older Pillow) holds 16-bit samples.
    """
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        bits, fmt = _first(tags.get(258, 16)), _first(tags.get(339, 1))
        signed = fmt == 2
        if bits == 32:
            return 2.0**31 - 1 if signed else 2.0**32 - 1
        if bits == 8:
            return 127.0 if signed else 255.0
        if bits == 16 and signed:
            return 32767.0
    return 65535.0


def _first(value):
    """A TIFF tag's first value (Pillow gives a tuple per sample, or one value)."""
    return value[0] if isinstance(value, tuple) and value else value


def resize(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[h, w] or [h, w, C] intensities -> float32 [H, W] or [H, W, C]: Lanczos on each channel in Pillow's
    float mode (one channel per image; no rounding to 8 bits), clipped to [0, 1]."""
    H, W = shape
    planes = pixels[:, :, None] if pixels.ndim == 2 else pixels
    out = np.empty((H, W, planes.shape[2]), dtype=np.float32)
    for c in range(planes.shape[2]):
        img = Image.fromarray(np.ascontiguousarray(planes[:, :, c], dtype=np.float32), mode="F")
        out[:, :, c] = np.asarray(img.resize((W, H), Image.Resampling.LANCZOS), dtype=np.float32)
    out = np.clip(out, 0.0, 1.0)
    return out[:, :, 0] if pixels.ndim == 2 else out
