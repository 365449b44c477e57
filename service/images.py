"""Images in and out: decode and validate uploads (Pillow), JSON pixel arrays, resizing, PNG grids.

Every image becomes float32 intensities in [0, 1], flattened row-major, ink = 1 (models/README.md), with
the model's channels (model_repository/pixels.py): a grayscale model gets colour converted to gray, a colour model
gets every image as RGB, flattened with the channels interleaved (row-major H x W x C). `invert` maps
x -> 1 - x for dark ink on a light background. Other sizes are resized (Lanczos, aspect ratio not kept) to
the model's.

Plain 8-bit grayscale PNGs, what Pillow, torchvision and most digit tools write, take a shorter road
(`_png_gray8`): libspng through pyspng decodes them several times faster than Pillow's Python layer, on
the event loop of POST /encode (docs/benchmarks.md). Pillow stays the reference for every other file and for any
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

from model_repository.pixels import as_channels, resize, to_float

# Formats accepted (Pillow format names; multi-picture JPEGs open through the JPEG plugin).
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
FORMATS_TEXT = "PNG, JPEG, BMP, GIF, TIFF or WebP"
Image.init()  # register every plugin, so that Image.open(formats=FORMATS) knows them all


class ImageError(Exception):
    """A client's image that cannot be used; the message names it (file name or images[i]) and says what
    is expected. Answered as a problem by service/errors.py, which gives each kind its HTTP status."""


class EmptyImageError(ImageError):
    """A file of no bytes."""


class InvalidImageError(ImageError):
    """A declared size of zero."""


class ImageTooLargeError(ImageError):
    """More pixels than the limit (refused before decoding)."""


class UnsupportedImageError(ImageError):
    """Not a file of FORMATS."""


class CorruptImageError(ImageError):
    """Truncated or damaged data."""


class InvalidImageArrayError(ImageError):
    """A JSON image of the wrong shape."""


class InvalidPixelValuesError(ImageError):
    """Pixel values that are not numbers in [0, 1]."""


@dataclass
class PreparedImage:
    x: np.ndarray  # float32 [D], D = H * W * C
    original_shape: tuple[int, int]  # (H, W) as received
    resized: bool
    source: str  # file name or "images[i]"


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
    for formats other than PNG); UnsupportedImageError or another ImageError when it is no
    image Pillow can identify."""
    size = png_size(data)
    if size is not None:
        return size
    if not data:
        raise EmptyImageError(f"{source}: the file is empty (expected a {FORMATS_TEXT} image)")
    with _pillow_errors(source, max_pixels):
        return Image.open(io.BytesIO(data), formats=FORMATS).size


def decode_plain_png(data: bytes, *, max_pixels: int) -> np.ndarray | None:
    """A plain 8-bit grayscale PNG -> float32 [H, W] in [0, 1]; None for any other file.

    Its cost is bounded by its declared size: no ancillary chunk is read (Pillow inflates text chunks, up
    to 64 MB of them), and the zlib stream is inflated to H * (W + 1) bytes at most.
    """
    return _png_gray8(data, max_pixels)


def decode_image(data: bytes, source: str, *, max_pixels: int, channels: int = 1) -> np.ndarray:
    """Bytes of an image file -> float32 [H, W] (channels = 1) or [H, W, 3] (channels = 3) in [0, 1];
    an ImageError otherwise."""
    pixels = _png_gray8(data, max_pixels)
    if pixels is not None:
        return as_channels(pixels, channels)
    return decode_with_pillow(data, source, max_pixels=max_pixels, channels=channels)


def decode_with_pillow(data: bytes, source: str, *, max_pixels: int, channels: int = 1) -> np.ndarray:
    """`decode_image` for any file Pillow reads (the reference decoder)."""
    if not data:
        raise EmptyImageError(f"{source}: the file is empty (expected a {FORMATS_TEXT} image)")
    with _pillow_errors(source, max_pixels), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = img.size  # declared in the header; nothing is decoded yet
        if width < 1 or height < 1:
            raise InvalidImageError(f"{source}: declared size {width}x{height}")
        if width * height > max_pixels:
            raise ImageTooLargeError(f"{source}: declares {width}x{height} = {width * height} pixels, more than the "
                               f"limit of {max_pixels} (refused before decoding)")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF / multi-page TIFF: the first frame
        img.load()
        return to_float(img, channels)


@contextlib.contextmanager
def _pillow_errors(source: str, max_pixels: int):
    """Pillow's errors on a client's file -> ImageError."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{source}: {e} (refused before decoding; the limit "
                           f"is {max_pixels} pixels)") from e
    except UnidentifiedImageError as e:
        raise UnsupportedImageError(f"{source}: not a {FORMATS_TEXT} image that Pillow can identify") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            struct.error, MemoryError, ZeroDivisionError, OverflowError, RuntimeError) as e:
        # Truncated or corrupt data: Pillow raises a variety of errors from its decoders.
        raise CorruptImageError(f"{source}: the image could not be decoded ({type(e).__name__}: "
                           f"{str(e)[:200]}); expected a complete {FORMATS_TEXT} file") from e


def prepare(pixels: np.ndarray, shape: tuple[int, int], *, invert: bool, source: str, channels: int = 1
            ) -> PreparedImage:
    """[h, w] (or [h, w, 3]) intensities in [0, 1] -> the model's [H * W * channels] input (gray repeated into
    RGB for a colour model, resized when needed, inverted on request)."""
    H, W = shape
    pixels = as_channels(pixels, channels)
    original = (int(pixels.shape[0]), int(pixels.shape[1]))
    resized = original != (H, W)
    if resized:
        pixels = resize(pixels, shape)
    x = np.ascontiguousarray(pixels, dtype=np.float32).reshape(H * W * channels)
    if invert:
        x = 1.0 - x
    return PreparedImage(x=x, original_shape=original, resized=resized, source=source)


_NUMBER_TYPES = frozenset((int, float))  # what a JSON parser gives for numbers; bool is a type of its own


def json_image_size(values, shape: tuple[int, int], index: int, channels: int = 1) -> tuple[int, int]:
    """The (h, w) of one JSON image, checked without converting a value: for a grayscale model an H x W
    nested list or a flat D = H * W list; for a colour model (channels = 3) an H x W x 3 nested list or a
    flat D = H * W * 3 list (row-major, channels interleaved).

    Each row must be an array of numbers (a string or a boolean is no intensity; for colour, of arrays of
    3 numbers) of the same length; a flat array needs exactly D numbers. InvalidImageArrayError or
    InvalidPixelValuesError otherwise, naming the first fault.
    """
    source = f"images[{index}]"
    H, W = shape
    D = H * W * channels
    if channels == 1:
        expected = f"expected {H} rows of {W} numbers, or {D} numbers, each in [0, 1]"
    else:
        expected = (f"expected {H} rows of {W} pixels, each pixel [R, G, B], or {D} numbers (row-major, channels "
                    "interleaved), each in [0, 1]")
    if not isinstance(values, list) or not values:
        raise InvalidImageArrayError(f"{source}: not a non-empty array; {expected}")
    if not isinstance(values[0], list):  # flat
        _check_numbers(values, source, expected)
        if len(values) != D:
            size = f"{H}x{W}" + (f"x{channels}" if channels > 1 else "")
            raise InvalidImageArrayError(f"{source}: a flat image needs exactly D = {D} "
                               f"values ({size}), got {len(values)}; send an H x W{' x 3' if channels > 1 else ''} "
                               "array to have it resized")
        return H, W
    w = len(values[0])
    for r, row in enumerate(values):
        if not isinstance(row, list) or len(row) != w or w == 0:
            got = f"{len(row)} values" if isinstance(row, list) else _a(row)
            raise InvalidImageArrayError(f"{source}[{r}]: not a rectangular array (rows must be "
                               f"non-empty arrays of one length, {w} as the first row), got {got}; {expected}")
        if channels == 1:
            _check_numbers(row, f"{source}[{r}]", expected)
        else:
            _check_rgb(row, f"{source}[{r}]", expected)
    return len(values), w


def _check_rgb(row: list, where: str, expected: str) -> None:
    for c, pixel in enumerate(row):
        if not isinstance(pixel, list) or len(pixel) != 3:
            got = f"{len(pixel)} values" if isinstance(pixel, list) else _a(pixel)
            raise InvalidImageArrayError(f"{where}[{c}]: a pixel of a colour model must be an "
                               f"array of 3 numbers [R, G, B], got {got}; {expected}")
        _check_numbers(pixel, f"{where}[{c}]", expected)


def _check_numbers(row: list, where: str, expected: str) -> None:
    if not _NUMBER_TYPES.issuperset(map(type, row)):
        bad = next(v for v in row if type(v) not in _NUMBER_TYPES)
        raise InvalidPixelValuesError(f"{where}: pixels must be numbers, got {_a(bad)}; "
                           f"{expected}")


def _json_type(value) -> str:
    return {bool: "boolean", str: "string", list: "array", dict: "object", type(None): "null", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _a(value) -> str:
    kind = _json_type(value)
    return "null" if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


def json_image(values: list, shape: tuple[int, int], index: int, channels: int = 1) -> np.ndarray:
    """One JSON image (see `json_image_size`) -> float32 [h, w] (or [h, w, 3]); an ImageError when malformed."""
    source = f"images[{index}]"
    h, w = json_image_size(values, shape, index, channels)
    try:  # row by row: in a worker thread, each row is a point where the event loop can take the GIL back
        a = np.empty((h, w) if channels == 1 else (h, w, channels), dtype=np.float64)
        if isinstance(values[0], list):
            for r, row in enumerate(values):
                a[r] = row
        else:
            a.reshape(-1)[:] = values
    except (ValueError, TypeError, OverflowError) as e:  # an integer beyond float range
        raise InvalidPixelValuesError(f"{source}: a value is not a finite number in [0, 1]") from e
    if not np.isfinite(a).all():
        raise InvalidPixelValuesError(f"{source}: NaN or infinite values (expected intensities "
                           "in [0, 1])")
    if a.min() < 0.0 or a.max() > 1.0:
        raise InvalidPixelValuesError(f"{source}: values must lie in [0, 1] (ink = 1), got "
                           f"min {a.min():.4g}, max {a.max():.4g}")
    return a.astype(np.float32)


def grid_shape(n: int, H: int, W: int, pad: int = 1) -> tuple[int, int]:
    """(height, width) of `png_grid`'s canvas for n images of H x W, before scaling."""
    if n == 1:
        return H, W
    ncols = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
    nrows = -(-n // ncols)
    return nrows * (H + pad) + pad, ncols * (W + pad) + pad


def png_grid(images: np.ndarray, *, scale: int = 1, pad: int = 1) -> bytes:
    """[n, H, W] (grayscale PNG) or [n, H, W, 3] (RGB PNG) in [0, 1] -> PNG bytes: one image, or a grid with
    `pad`-pixel gray separators."""
    images = np.clip(np.nan_to_num(images, nan=0.0), 0.0, 1.0)
    n, H, W = images.shape[:3]
    if n == 1:
        canvas = images[0]
    else:
        rows, cols = grid_shape(n, H, W, pad)
        ncols = (cols - pad) // (W + pad)
        canvas = np.full((rows, cols, *images.shape[3:]), 0.5, dtype=np.float32)
        for i in range(n):
            r, c = divmod(i, ncols)
            top, left = pad + r * (H + pad), pad + c * (W + pad)
            canvas[top:top + H, left:left + W] = images[i]
    u8 = np.round(canvas * 255.0).astype(np.uint8)
    if scale > 1:
        u8 = np.repeat(np.repeat(u8, scale, axis=0), scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L" if u8.ndim == 2 else "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
