"""Colour in service/images.py and model_repository/pixels.py against Pillow, the reference.

A colour model takes every upload as Pillow's "RGB" of it (transparent pixels composited onto white first,
gray repeated into the three channels), resized channel by channel, flattened row-major with the channels
interleaved; a grayscale model still takes Pillow's "L". PNG answers of colour models are RGB.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import problem_for
from service.images import ImageError, decode_image, json_image, json_image_size, png_grid, prepare

MAX_PIXELS = 1 << 20
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (9, 7), dtype=np.uint8)


def encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def on_white(img: Image.Image) -> Image.Image:
    """Pillow's own compositing of an image with alpha onto an opaque white background."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def pillow_rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


rgba = Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA")
gray = Image.fromarray(RGB[..., 0], mode="L")
CASES = {  # name -> (file bytes, the pixels Pillow gives for RGB)
    "rgb-png": (encoded(Image.fromarray(RGB)), pillow_rgb(Image.fromarray(RGB))),
    "rgba-png": (encoded(rgba), pillow_rgb(on_white(rgba))),
    "palette-png": (encoded(Image.fromarray(RGB).convert("P")), pillow_rgb(Image.fromarray(RGB).convert("P"))),
    "gray-png": (encoded(gray), pillow_rgb(gray)),  # the libspng fast path, then repeated into RGB
    "gray-alpha-png": (encoded(Image.fromarray(np.dstack([RGB[..., 1], ALPHA]), mode="LA")),
                       pillow_rgb(on_white(Image.fromarray(np.dstack([RGB[..., 1], ALPHA]), mode="LA")))),
    "rgb-jpeg": (encoded(Image.fromarray(RGB), "JPEG", quality=95),
                 pillow_rgb(Image.open(io.BytesIO(encoded(Image.fromarray(RGB), "JPEG", quality=95))))),
    "cmyk-jpeg": (encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95),
                  pillow_rgb(Image.open(io.BytesIO(encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG",
                                                           quality=95))))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_colour_models_get_pillows_rgb(name):
    data, want = CASES[name]
    got = decode_image(data, name, max_pixels=MAX_PIXELS, channels=3)
    assert got.shape == want.shape == (9, 7, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-7)
    # flattened row-major with the channels interleaved: x[(i * W + j) * 3 + c]
    x = prepare(got, (9, 7), invert=False, source=name, channels=3).x
    assert x.shape == (9 * 7 * 3,)
    assert x[(4 * 7 + 5) * 3 + 2] == got[4, 5, 2]


@pytest.mark.parametrize("name", sorted(CASES))
def test_grayscale_models_still_get_pillows_luma(name):
    data, _ = CASES[name]
    img = Image.open(io.BytesIO(data))
    want = np.asarray((on_white(img) if "alpha" in name or "rgba" in name else img).convert("L"),
                      dtype=np.float64) / 255.0
    got = decode_image(data, name, max_pixels=MAX_PIXELS)  # channels = 1, the default
    assert got.shape == (9, 7)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert prepare(got, (9, 7), invert=False, source=name).x.shape == (63,)


def test_sixteen_bit_gray_keeps_its_precision_in_rgb():
    g16 = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    got = decode_image(encoded(Image.fromarray(g16)), "g16", max_pixels=MAX_PIXELS, channels=3)
    np.testing.assert_allclose(got, np.repeat(g16[..., None] / 65535.0, 3, axis=2), atol=1e-7)


def test_resizing_is_per_channel_in_pillows_float_mode():
    pixels = RGB.astype(np.float32) / 255.0
    got = prepare(pixels, (5, 11), invert=False, source="x", channels=3)
    assert got.resized and got.original_shape == (9, 7)
    # Pillow resizes each band of the RGB image in its 32-bit float mode (its 8-bit RGB resize would round and
    # clip between its horizontal and vertical passes); the result is clipped to [0, 1]
    bands = [np.asarray(band.convert("F").point(lambda v: v / 255.0).resize((11, 5), Image.Resampling.LANCZOS))
             for band in Image.fromarray(RGB).split()]
    np.testing.assert_allclose(got.x.reshape(5, 11, 3), np.clip(np.stack(bands, axis=2), 0, 1), atol=1e-6)
    inverted = prepare(pixels, (5, 11), invert=True, source="x", channels=3).x
    np.testing.assert_allclose(inverted, 1.0 - got.x, atol=1e-7)
    # a grayscale upload to a colour model: its resized gray, in all three channels
    g = prepare(pixels[..., 0], (5, 11), invert=False, source="g", channels=3).x.reshape(5, 11, 3)
    np.testing.assert_array_equal(g, np.repeat(g[..., :1], 3, axis=2))
    np.testing.assert_allclose(g[..., 0], got.x.reshape(5, 11, 3)[..., 0], atol=1e-7)


def test_json_colour_images():
    H, W = 2, 3
    rgb = RNG.random((H, W, 3)).round(3)
    nested = json_image(rgb.tolist(), (H, W), 0, channels=3)
    flat = json_image(rgb.reshape(-1).tolist(), (H, W), 0, channels=3)
    np.testing.assert_allclose(nested, rgb, atol=1e-7)
    np.testing.assert_array_equal(flat, nested)
    assert json_image_size(RNG.random((4, 5, 3)).tolist(), (H, W), 0, channels=3) == (4, 5)  # resized later
    bad = {
        "a pixel of a colour model must be an array of 3 numbers [R, G, B], got 2 values":
            [[[0.1, 0.2]] * W] * H,
        "a pixel of a colour model must be an array of 3 numbers [R, G, B], got a number": rgb[..., 0].tolist(),
        "a flat image needs exactly D = 18 values (2x3x3), got 6": rgb[..., 0].reshape(-1).tolist(),
        "pixels must be numbers, got a string": [[[0.1, 0.2, "x"]] * W] * H,
    }
    for message, values in bad.items():
        with pytest.raises(ImageError) as e:
            json_image(values, (H, W), 0, channels=3)
        assert problem_for(e.value).status == 422 and message in str(e.value), e.value
    with pytest.raises(ImageError) as e:  # a grayscale model refuses colour arrays, as before
        json_image(rgb.tolist(), (H, W), 0)
    assert problem_for(e.value).status == 422 and "pixels must be numbers, got an array" in str(e.value)


def test_png_grid_of_colour_images_is_rgb():
    images = RNG.random((3, 4, 5, 3)).astype(np.float32)
    one = Image.open(io.BytesIO(png_grid(images[:1], scale=2)))
    assert one.mode == "RGB" and one.size == (10, 8)
    np.testing.assert_array_equal(np.asarray(one)[::2, ::2], np.round(images[0] * 255).astype(np.uint8))
    grid = Image.open(io.BytesIO(png_grid(images)))
    assert grid.mode == "RGB" and grid.size == (2 * 6 + 1, 2 * 5 + 1)  # 2 x 2 tiles, 1-pixel separators
    a = np.asarray(grid)
    for k, (top, left) in enumerate([(1, 1), (1, 7), (6, 1)]):
        np.testing.assert_array_equal(a[top:top + 4, left:left + 5], np.round(images[k] * 255).astype(np.uint8))
    assert (a[0] == 128).all() and (a[6:10, 7:12] == 128).all()  # separators and the empty tile: mid-gray
    assert Image.open(io.BytesIO(png_grid(images[..., 0]))).mode == "L"  # grayscale stays grayscale
