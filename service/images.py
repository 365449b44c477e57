"""Images in and out: decode and validate uploads (Pillow), JSON pixel arrays, resizing, PNG grids.

Every image becomes float32 intensities in [0, 1], flattened row-major, ink = 1 (models/README.md).
Colour is converted to grayscale (ITU-R 601-2 luma, Pillow's "L"); transparent pixels are composited
onto white, as a viewer shows them; 16-bit images keep their precision. `invert` maps x -> 1 - x for
dark ink on a light background. Other sizes are resized (Lanczos, aspect ratio not kept) to the model's.

Plain 8-bit grayscale PNGs, what Pillow, torchvision and most digit tools write, take a shorter road
(`_png_gray8`): libspng through pyspng decodes them in about a sixth of the time Pillow's Python layer
takes, on the event loop of POST /encode. Pillow stays the reference for every other file and for any
damage: the fast path only accepts files that Pillow decodes to the same pixels (tests/service/test_images.py).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError

from service.errors import ProblemError

# Formats accepted (Pillow format names; multi-picture JPEGs open through the JPEG plugin).
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
FORMATS_TEXT = "PNG, JPEG, BMP, GIF, TIFF or WebP"
Image.init()  # register every plugin, so that Image.open(formats=FORMATS) knows them all


@dataclass
class PreparedImage:
    x: np.ndarray  # float32 [D]
    original_shape: tuple[int, int]  # (H, W) as received
    resized: bool
    source: str  # file name or "images[i]"


def _to_float_gray(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> float32 [H, W] in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if mode == "I":  # 32-bit integer; Pillow gives 16-bit PNG/TIFF this mode
        a = np.asarray(img, dtype=np.float64)
        return (np.clip(a, 0, 65535) / (65535.0 if a.max(initial=0) > 255 else 255.0)).astype(np.float32)
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(a / 255.0 if a.max(initial=0) > 1 else a, 0, 1).astype(np.float32)
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type
_IHDR = struct.Struct(">IIBBBBB")  # width, height, bit depth, colour type, compression, filter, interlace


def _png_gray8(data: bytes, max_pixels: int) -> np.ndarray | None:
    """A plain 8-bit grayscale PNG -> float32 [H, W] in [0, 1]; None for any other file (Pillow decodes those).

    Plain: IHDR with bit depth 8, colour type 0 (gray), no interlacing, then IDAT chunks and IEND and
    nothing else, every chunk's CRC right, at most `max_pixels` pixels, and a zlib stream that inflates
    completely, its checksum right, to exactly H * (W + 1) bytes (a filter byte per row). libspng
    itself ignores CRC errors (pyspng asks it to), so these checks are what makes its answer Pillow's.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, size, header, idat = 8, len(data), None, []
    while True:
        if pos + 12 > size:
            return None
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        end = pos + 8 + length
        if end + 4 > size or zlib.crc32(memoryview(data)[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return None
        if header is None:
            if kind != b"IHDR" or length != _IHDR.size:
                return None
            header = _IHDR.unpack_from(data, pos + 8)
        elif kind == b"IDAT":
            idat.append(data[pos + 8:end])
        elif kind == b"IEND":
            break
        else:
            return None
        pos = end + 4
    width, height, *layout = header
    if layout != [8, 0, 0, 0, 0] or not 0 < width * height <= max_pixels:
        return None
    expected = height * (width + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), expected + 1)  # a zlib bomb stops here
    except zlib.error:
        return None
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        return None
    try:
        pixels = pyspng.load(data)
    except (RuntimeError, ValueError):
        return None
    return pixels.astype(np.float32) / 255.0


def decode_image(data: bytes, source: str, *, max_pixels: int) -> np.ndarray:
    """Bytes of an image file -> float32 [H, W] in [0, 1]; ProblemError (413/415/422) otherwise."""
    pixels = _png_gray8(data, max_pixels)
    return pixels if pixels is not None else decode_with_pillow(data, source, max_pixels=max_pixels)


def decode_with_pillow(data: bytes, source: str, *, max_pixels: int) -> np.ndarray:
    """`decode_image` for any file Pillow reads (the reference decoder)."""
    if not data:
        raise ProblemError(422, "Empty image", f"{source}: the file is empty (expected a {FORMATS_TEXT} image)",
                           slug="empty-image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size  # declared in the header; nothing is decoded yet
            if width < 1 or height < 1:
                raise ProblemError(422, "Invalid image", f"{source}: declared size {width}x{height}",
                                   slug="invalid-image")
            if width * height > max_pixels:
                raise ProblemError(413, "Image too large",
                                   f"{source}: declares {width}x{height} = {width * height} pixels, more than the "
                                   f"limit of {max_pixels} (refused before decoding)", slug="image-too-large")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF / multi-page TIFF: the first frame
            img.load()
            return _to_float_gray(img)
    except ProblemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ProblemError(413, "Image too large", f"{source}: {e} (refused before decoding; the limit "
                           f"is {max_pixels} pixels)", slug="image-too-large") from e
    except UnidentifiedImageError as e:
        raise ProblemError(415, "Unsupported media type",
                           f"{source}: not a {FORMATS_TEXT} image that Pillow can identify",
                           slug="unsupported-image") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            struct.error, MemoryError, ZeroDivisionError, OverflowError, RuntimeError) as e:
        # Truncated or corrupt data: Pillow raises a variety of errors from its decoders.
        raise ProblemError(422, "Corrupt image", f"{source}: the image could not be decoded ({type(e).__name__}: "
                           f"{str(e)[:200]}); expected a complete {FORMATS_TEXT} file", slug="corrupt-image") from e


def prepare(pixels: np.ndarray, shape: tuple[int, int], *, invert: bool, source: str) -> PreparedImage:
    """[h, w] intensities in [0, 1] -> the model's [H * W] input (resized when needed, inverted on request)."""
    H, W = shape
    original = (int(pixels.shape[0]), int(pixels.shape[1]))
    resized = original != (H, W)
    if resized:
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        pixels = np.asarray(img.resize((W, H), Image.Resampling.LANCZOS), dtype=np.float32)
        pixels = np.clip(pixels, 0.0, 1.0)
    x = np.ascontiguousarray(pixels, dtype=np.float32).reshape(H * W)
    if invert:
        x = 1.0 - x
    return PreparedImage(x=x, original_shape=original, resized=resized, source=source)


def json_image(values: list, shape: tuple[int, int], index: int) -> np.ndarray:
    """One JSON image (H x W nested list, or flat D) -> float32 [h, w]; ProblemError 422 when malformed."""
    source = f"images[{index}]"
    H, W = shape
    try:
        a = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ProblemError(422, "Invalid image array", f"{source}: not a rectangular array of numbers "
                           f"(expected {H} rows of {W} numbers, or {H * W} numbers)", slug="invalid-image-array") from e
    if a.ndim == 1:
        if a.size != H * W:
            raise ProblemError(422, "Invalid image array", f"{source}: a flat image needs exactly D = {H * W} "
                               f"values ({H}x{W}), got {a.size}; send an H x W array to have it resized",
                               slug="invalid-image-array")
        a = a.reshape(H, W)
    elif a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ProblemError(422, "Invalid image array", f"{source}: expected {H} rows of {W} numbers or {H * W} "
                           f"numbers, got an array of shape {list(a.shape)}", slug="invalid-image-array")
    if not np.isfinite(a).all():
        raise ProblemError(422, "Invalid pixel values", f"{source}: NaN or infinite values (expected intensities "
                           "in [0, 1])", slug="invalid-pixel-values")
    if a.min() < 0.0 or a.max() > 1.0:
        raise ProblemError(422, "Invalid pixel values", f"{source}: values must lie in [0, 1] (ink = 1), got "
                           f"min {a.min():.4g}, max {a.max():.4g}", slug="invalid-pixel-values")
    return a.astype(np.float32)


def grid_shape(n: int, H: int, W: int, pad: int = 1) -> tuple[int, int]:
    """(height, width) of `png_grid`'s canvas for n images of H x W, before scaling."""
    if n == 1:
        return H, W
    ncols = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    nrows = -(-n // ncols)
    return nrows * (H + pad) + pad, ncols * (W + pad) + pad


def png_grid(images: np.ndarray, *, scale: int = 1, pad: int = 1) -> bytes:
    """[n, H, W] in [0, 1] -> PNG bytes: one image, or a grid with `pad`-pixel gray separators."""
    images = np.clip(np.nan_to_num(images, nan=0.0), 0.0, 1.0)
    n, H, W = images.shape
    if n == 1:
        canvas = images[0]
    else:
        rows, cols = grid_shape(n, H, W, pad)
        ncols = (cols - pad) // (W + pad)
        canvas = np.full((rows, cols), 0.5, dtype=np.float32)
        for i in range(n):
            r, c = divmod(i, ncols)
            top, left = pad + r * (H + pad), pad + c * (W + pad)
            canvas[top:top + H, left:left + W] = images[i]
    u8 = np.round(canvas * 255.0).astype(np.uint8)
    if scale > 1:
        u8 = np.repeat(np.repeat(u8, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
