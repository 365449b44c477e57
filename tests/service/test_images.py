"""service/images.py: the libspng fast path for plain 8-bit grayscale PNGs against Pillow, the reference.

Whatever the bytes, `decode_image` must give what Pillow alone gives: the same pixels, or an error with the
same status. And the fast path must really be taken for what Pillow writes, or it is dead code.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from service.errors import problem_for
from service.images import ImageError, _png_gray8, decode_image, decode_with_pillow

MAX_PIXELS = 4096


def png_bytes(pixels: np.ndarray, mode: str = "L", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def outcome(decode, data: bytes) -> tuple[str, object]:
    """('pixels', array) or ('error', status) of one decoder on `data`."""
    try:
        return "pixels", decode(data, "t.png", max_pixels=MAX_PIXELS)
    except ImageError as e:
        return "error", problem_for(e).status


def assert_same_outcome(data: bytes) -> None:
    got, want = outcome(decode_image, data), outcome(decode_with_pillow, data)
    assert got[0] == want[0], (got, want)
    if got[0] == "pixels":
        assert got[1].dtype == want[1].dtype == np.float32
        np.testing.assert_array_equal(got[1], want[1])
    else:
        assert got[1] == want[1]


gray_images = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1)).map(
    lambda t: np.random.default_rng(t[2]).integers(0, 256, size=t[:2], dtype=np.uint8))


@settings(max_examples=150, deadline=None)
@given(pixels=gray_images, level=st.integers(0, 9), optimize=st.booleans(), smooth=st.booleans())
def test_fast_path_decodes_what_pillow_writes_to_the_same_pixels(pixels, level, optimize, smooth):
    if smooth:  # gradients make the encoder choose Sub, Up, Average and Paeth filters, not just None
        pixels = np.cumsum(pixels // 16, axis=1, dtype=np.uint8)
    data = png_bytes(pixels, compress_level=level, optimize=optimize)
    fast = _png_gray8(data, MAX_PIXELS)
    assert fast is not None, "the fast path must take Pillow's own 8-bit grayscale PNGs"
    np.testing.assert_array_equal(fast, decode_with_pillow(data, "t.png", max_pixels=MAX_PIXELS))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png_with_filters(pixels: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit grayscale PNG whose row r is written with filter type filters[r] (PNG spec, section 9)."""
    height, width = pixels.shape
    rows, prev = [], [0] * width
    for r in range(height):
        cur = [int(v) for v in pixels[r]]
        out = bytearray([filters[r]])
        for i, x in enumerate(cur):
            a, b, c = (cur[i - 1] if i else 0), prev[i], (prev[i - 1] if i else 0)
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][filters[r]]
            out.append((x - pred) % 256)
        rows.append(bytes(out))
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


@settings(max_examples=100, deadline=None)
@given(pixels=gray_images, data=st.data())
def test_fast_path_undoes_every_row_filter_as_pillow_does(pixels, data):
    """Rows written with each of the five filters (Pillow's encoder never picks Average for these)."""
    filters = data.draw(st.lists(st.integers(0, 4), min_size=len(pixels), max_size=len(pixels)))
    png = png_with_filters(pixels, filters)
    fast = _png_gray8(png, MAX_PIXELS)
    assert fast is not None
    np.testing.assert_array_equal(fast, decode_with_pillow(png, "t.png", max_pixels=MAX_PIXELS))
    np.testing.assert_array_equal(fast, pixels / np.float32(255))


def _chunks(data: bytes, kind: bytes) -> list[bytes]:
    out, pos = [], 8
    while pos < len(data):
        length, k = struct.unpack_from(">I4s", data, pos)
        if k == kind:
            out.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return out


@pytest.mark.parametrize("case", ["rgb", "rgba", "palette", "16-bit", "bilevel", "text-chunk", "too-many-pixels",
                                  "jpeg"])
def test_other_files_go_to_pillow(case):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(9, 7), dtype=np.uint8)
    if case == "text-chunk":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", "test")
        data = png_bytes(gray, pnginfo=info)
    elif case == "too-many-pixels":
        data = png_bytes(rng.integers(0, 256, size=(65, 64), dtype=np.uint8))
    elif case == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, format="JPEG")
        data = buf.getvalue()
    elif case == "16-bit":
        buf = io.BytesIO()
        Image.fromarray(gray.astype(np.uint16) * 257).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = png_bytes(gray, {"rgb": "RGB", "rgba": "RGBA", "palette": "P", "bilevel": "1"}[case])
    assert _png_gray8(data, MAX_PIXELS) is None
    assert_same_outcome(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixels=gray_images, data=st.data())
def test_damaged_pngs_get_pillows_verdict(pixels, data):
    """Flipped bytes, truncation, junk after the end: the same pixels or the same error as Pillow alone."""
    png = bytearray(png_bytes(pixels))
    damage = data.draw(st.sampled_from(["flip", "truncate", "append", "flip-and-fix-crc"]))
    if damage == "truncate":
        png = png[:data.draw(st.integers(0, len(png) - 1))]
    elif damage == "append":
        png += data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(8, len(png) - 1))
        png[i] ^= data.draw(st.integers(1, 255))
        if damage == "flip-and-fix-crc":
            _fix_crcs(png)
    assert_same_outcome(bytes(png))


def _fix_crcs(png: bytearray) -> None:
    """Recompute every chunk's CRC, so that only the checks after the CRCs can catch the damage."""
    pos = 8
    while pos + 12 <= len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(png):
            return
        png[end:end + 4] = zlib.crc32(png[pos + 4:end]).to_bytes(4, "big")
        pos = end + 4


def test_zlib_bomb_in_a_small_png_is_not_inflated_whole():
    """An IDAT stream that inflates far past H * (W + 1) bytes is refused after that many bytes."""
    width = height = 8
    raw = zlib.compress(b"\0" * (50 * 1024 * 1024), 9)  # 50 MB of zeros in about 50 KB
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    assert _png_gray8(data, MAX_PIXELS) is None
    assert_same_outcome(data)


@pytest.mark.parametrize("dtype, fmt, top", [(np.uint16, "PNG", 65535), (np.uint16, "TIFF", 65535),
                                              (np.int32, "TIFF", 2**31 - 1)])
def test_deep_integer_images_are_scaled_by_their_type_range(dtype, fmt, top):
    """Not by the image's own maximum: a dim image stays dim (the reference: the values / the type's top)."""
    a = np.random.default_rng(1).integers(0, top // 100, size=(6, 7), endpoint=True)
    buf = io.BytesIO()
    Image.fromarray(a.astype(dtype)).save(buf, format=fmt)
    got = decode_image(buf.getvalue(), "x", max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(got, a / top, rtol=1e-6, atol=1e-9)
    assert got.max() < 0.011


def test_float_images_are_intensities_clipped_to_the_unit_range():
    a = np.array([[-1.0, 0.0, 0.25], [1.0, 7.0, np.nan]], dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="TIFF")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), "x", max_pixels=MAX_PIXELS),
                                  np.array([[0, 0, 0.25], [1, 1, 0]], dtype=np.float32))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
def test_declared_size_is_read_without_decoding(fmt, monkeypatch):
    from service.images import declared_size, png_size

    buf = io.BytesIO()
    Image.new("L", (37, 11)).save(buf, format=fmt)
    data = buf.getvalue()
    from PIL import ImageFile, TiffImagePlugin, WebPImagePlugin

    for cls in (Image.Image, ImageFile.ImageFile, TiffImagePlugin.TiffImageFile, WebPImagePlugin.WebPImageFile):
        monkeypatch.setattr(cls, "load", lambda self: pytest.fail("decoded"))
    assert declared_size(data, "x", max_pixels=MAX_PIXELS) == (37, 11)
    assert png_size(data) == ((37, 11) if fmt == "PNG" else None)
    with pytest.raises(ImageError) as e:
        declared_size(b"not an image", "x", max_pixels=MAX_PIXELS)
    assert problem_for(e.value).status == 415


def test_every_kind_of_image_error_has_its_http_answer():
    """images.py raises domain errors; service/errors.py gives each its status (a kind without one: a 500)."""
    kinds = ImageError.__subclasses__()
    assert len(kinds) >= 7
    statuses = {cls.__name__: problem_for(cls("images[0]: what is wrong")).status for cls in kinds}
    assert set(statuses.values()) <= {413, 415, 422}, statuses
    assert statuses["ImageTooLargeError"] == 413 and statuses["UnsupportedImageError"] == 415
