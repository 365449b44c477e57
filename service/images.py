"""Images in and out: decode and validate uploads (Pillow), JSON pixel arrays, resizing, PNG grids.

Every image becomes float32 intensities in [0, 1], flattened row-major, ink = 1 (models/README.md).
Colour is converted to grayscale (ITU-R 601-2 luma, Pillow's "L"); transparent pixels are composited
onto white, as a viewer shows them; 16- and 32-bit images keep their precision, scaled by their type's
range. `invert` maps x -> 1 - x for dark ink on a light background. Other sizes are resized (Lanczos,
aspect ratio not kept) to the model's.

Plain 8-bit grayscale PNGs, what Pillow, torchvision and most digit tools write, take a shorter road
(`_png_gray8`): libspng through pyspng decodes them in about a sixth of the time Pillow's Python layer
takes, on the event loop of POST /encode. Pillow stays the reference for every other file and for any
damage: the fast path only accepts files that Pillow decodes to the same pixels (tests/service/test_images.py).
"""

from __future__ import annotations

import contextlib
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
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


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


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a PNG file declares in its IHDR chunk (no decoding); None for anything else.

    Pillow reads the same header, so a PNG decodes to exactly this size or not at all.
    """
    if len(data) < 8 + 8 + _IHDR.size or not data.startswith(PNG_SIGNATURE):
        return None
    length, kind = _CHUNK_HEAD.unpack_from(data, 8)
    if kind != b"IHDR" or length != _IHDR.size:
        return None
    width, height = _IHDR.unpack_from(data, 16)[:2]
    return width, height


def declared_size(data: bytes, source: str, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) an image file declares, read from its header without decoding (Pillow's lazy open
    for formats other than PNG); ProblemError 415/422 when it is no image Pillow can identify."""
    size = png_size(data)
    if size is not None:
        return size
    if not data:
        raise ProblemError(422, "Empty image", f"{source}: the file is empty (expected a {FORMATS_TEXT} image)",
                           slug="empty-image")
    with _pillow_errors(source, max_pixels):
        return Image.open(io.BytesIO(data), formats=FORMATS).size


def decode_plain_png(data: bytes, *, max_pixels: int) -> np.ndarray | None:
    """A plain 8-bit grayscale PNG -> float32 [H, W] in [0, 1]; None for any other file.

    Its cost is bounded by its declared size: no ancillary chunk is read (Pillow inflates text chunks, up
    to 64 MB of them), and the zlib stream is inflated to H * (W + 1) bytes at most.
    """
    return _png_gray8(data, max_pixels)


def decode_image(data: bytes, source: str, *, max_pixels: int) -> np.ndarray:
    """Bytes of an image file -> float32 [H, W] in [0, 1]; ProblemError (413/415/422) otherwise."""
    pixels = _png_gray8(data, max_pixels)
    return pixels if pixels is not None else decode_with_pillow(data, source, max_pixels=max_pixels)


def decode_with_pillow(data: bytes, source: str, *, max_pixels: int) -> np.ndarray:
    """`decode_image` for any file Pillow reads (the reference decoder)."""
    if not data:
        raise ProblemError(422, "Empty image", f"{source}: the file is empty (expected a {FORMATS_TEXT} image)",
                           slug="empty-image")
    with _pillow_errors(source, max_pixels), warnings.catch_warnings():
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
        return to_float_gray(img)


@contextlib.contextmanager
def _pillow_errors(source: str, max_pixels: int):
    """Pillow's errors on a client's file -> ProblemError 413/415/422."""
    try:
        yield
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


_NUMBER_TYPES = frozenset((int, float))  # what a JSON parser gives for numbers; bool is a type of its own


def json_image_size(values, shape: tuple[int, int], index: int) -> tuple[int, int]:
    """The (h, w) of one JSON image (H x W nested list, or flat D), checked without converting a value.

    Each row must be an array of numbers (a string or a boolean is no intensity) of the same length; a
    flat array needs exactly D = H * W numbers. ProblemError 422 otherwise, naming the first fault.
    """
    source = f"images[{index}]"
    H, W = shape
    expected = f"expected {H} rows of {W} numbers, or {H * W} numbers, each in [0, 1]"
    if not isinstance(values, list) or not values:
        raise ProblemError(422, "Invalid image array", f"{source}: not a non-empty array; {expected}",
                           slug="invalid-image-array")
    if not isinstance(values[0], list):  # flat
        _check_numbers(values, source, expected)
        if len(values) != H * W:
            raise ProblemError(422, "Invalid image array", f"{source}: a flat image needs exactly D = {H * W} "
                               f"values ({H}x{W}), got {len(values)}; send an H x W array to have it resized",
                               slug="invalid-image-array")
        return H, W
    w = len(values[0])
    for r, row in enumerate(values):
        if not isinstance(row, list) or len(row) != w or w == 0:
            got = f"{len(row)} values" if isinstance(row, list) else _a(row)
            raise ProblemError(422, "Invalid image array", f"{source}[{r}]: not a rectangular array (rows must be "
                               f"non-empty arrays of one length, {w} as the first row), got {got}; {expected}",
                               slug="invalid-image-array")
        _check_numbers(row, f"{source}[{r}]", expected)
    return len(values), w


def _check_numbers(row: list, where: str, expected: str) -> None:
    if not _NUMBER_TYPES.issuperset(map(type, row)):
        bad = next(v for v in row if type(v) not in _NUMBER_TYPES)
        raise ProblemError(422, "Invalid pixel values", f"{where}: pixels must be numbers, got {_a(bad)}; "
                           f"{expected}", slug="invalid-pixel-values")


def _json_type(value) -> str:
    return {bool: "boolean", str: "string", list: "array", dict: "object", type(None): "null"}.get(
        type(value), type(value).__name__)


def _a(value) -> str:
    kind = _json_type(value)
    return "null" if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


def json_image(values: list, shape: tuple[int, int], index: int) -> np.ndarray:
    """One JSON image (H x W nested list, or flat D) -> float32 [h, w]; ProblemError 422 when malformed."""
    source = f"images[{index}]"
    h, w = json_image_size(values, shape, index)
    try:  # row by row: in a worker thread, each row is a point where the event loop can take the GIL back
        a = np.empty((h, w), dtype=np.float64)
        if isinstance(values[0], list):
            for r, row in enumerate(values):
                a[r] = row
        else:
            a.reshape(-1)[:] = values
    except (ValueError, TypeError, OverflowError) as e:  # an integer beyond float range
        raise ProblemError(422, "Invalid pixel values", f"{source}: a value is not a finite number in [0, 1]",
                           slug="invalid-pixel-values") from e
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
