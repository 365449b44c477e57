"""Colour user data: --channels 1|3 (default: the data's own), RGB arrays, IDX files and folders, with Pillow as
the reference for every conversion of a file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.data import load_dataset, reload_dataset
from training.user_data import DataError, load_images

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 9, 3), dtype=np.uint8)  # N, H, W, C


def test_rgb_arrays_are_colour_by_default_with_channels_interleaved(tmp_path):
    np.save(tmp_path / "rgb.npy", RGB)
    data = load_dataset(tmp_path / "rgb.npy", test_fraction=0.25)
    assert data.channels == 3 and data.image_shape == (10, 9) and data.pixel_shape == (10, 9, 3)
    assert data.data_dim == 10 * 9 * 3 == data.train.shape[1]
    assert data.summary()["channels"] == 3
    rows = np.concatenate([data.train, data.valid, data.test])
    # every row is one image flattened row-major H x W x C: x[(i * W + j) * 3 + c]
    want = {tuple(np.round(im.reshape(-1) / 255.0, 12)) for im in RGB}
    assert {tuple(np.round(r, 12)) for r in rows} == want
    np.save(tmp_path / "rgbf.npy", RGB.astype(np.float32) / 255.0)
    np.testing.assert_allclose(load_images(tmp_path / "rgbf.npy"), RGB / 255.0, atol=1e-7)


def test_channels_convert_arrays(tmp_path):
    np.save(tmp_path / "rgb.npy", RGB)
    gray = load_images(tmp_path / "rgb.npy", channels=1)
    # ITU-R 601-2 luma, as Pillow's "L" (which rounds it to 8 bits)
    pillow = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in RGB]) / 255.0
    assert gray.shape == (12, 10, 9)
    np.testing.assert_allclose(gray, pillow, atol=0.5 / 255 + 1e-9)
    np.save(tmp_path / "gray.npy", RGB[..., 0])
    rgb = load_images(tmp_path / "gray.npy", channels=3)
    np.testing.assert_array_equal(rgb, np.repeat(RGB[..., :1] / 255.0, 3, axis=3))
    with pytest.raises(DataError, match="--channels 2: expected 1 .grayscale. or 3 .RGB."):
        load_images(tmp_path / "gray.npy", channels=2)


@pytest.mark.parametrize("gz", [False, True])
def test_four_dimensional_idx_files(tmp_path, gz):
    payload = bytes([0, 0, 0x08, 4]) + struct.pack(">4I", *RGB.shape) + RGB.tobytes()
    path = tmp_path / ("images-idx4-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    np.testing.assert_allclose(load_images(path), RGB / 255.0)


def _folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(RGB[0]).save(folder / "a_rgb.png")
    Image.fromarray(np.dstack([RGB[1], RGB[2][..., 0]]), mode="RGBA").save(folder / "b_rgba.png")
    Image.fromarray(RGB[3][..., 0], mode="L").save(folder / "c_gray.png")
    Image.fromarray(RGB[4]).resize((18, 20)).save(folder / "d_big.png")
    return folder


def test_a_mixed_folder_needs_channels_and_converts_like_pillow(tmp_path, capsys):
    folder = _folder(tmp_path)
    with pytest.raises(DataError, match="mixes 1 grayscale images .c_gray.png. with 3 colour images.*--channels 3"):
        load_images(folder)
    white = Image.new("RGBA", (9, 10), (255, 255, 255, 255))
    with Image.open(folder / "b_rgba.png") as im:
        composited = Image.alpha_composite(white, im.convert("RGBA"))
    rgb = load_images(folder, channels=3)
    assert rgb.shape == (4, 10, 9, 3)  # the first file's size; d_big.png resized
    np.testing.assert_allclose(rgb[0], RGB[0] / 255.0, atol=1e-7)
    np.testing.assert_allclose(rgb[1], np.asarray(composited.convert("RGB")) / 255.0, atol=1e-7)
    np.testing.assert_allclose(rgb[2], np.repeat(RGB[3][..., :1], 3, axis=2) / 255.0, atol=1e-7)
    gray = load_images(folder, channels=1)
    np.testing.assert_allclose(gray[0], np.asarray(Image.fromarray(RGB[0]).convert("L")) / 255.0, atol=1e-7)
    np.testing.assert_allclose(gray[1], np.asarray(composited.convert("L")) / 255.0, atol=1e-7)
    # a fit records the channels, and reloading its split gives the same rows
    out = tmp_path / "run"
    assert main(["fit", "--model", "ppca", "--method", "closed-form", "--latent-dim", "1", "--dataset", str(folder),
                 "--channels", "3", "--test-fraction", "0.25", "--valid-fraction", "0", "--out", str(out),
                 "--quiet", "--no-export"]) == 0, capsys.readouterr().err
    from training.common import load_checkpoint

    meta = load_checkpoint(out)["meta"]
    assert meta["channels"] == 3 and meta["image_shape"] == [10, 9]
    assert reload_dataset(meta).channels == 3 and reload_dataset(meta).data_dim == 270
    for png in ("directions.png", "samples.png"):  # plotted in colour: some pixels are not gray
        with Image.open(out / png) as im:
            a = np.asarray(im.convert("RGB"), dtype=int)
        assert (np.abs(a[..., 0] - a[..., 1]) > 16).any(), png


def test_embedded_datasets_are_grayscale(tmp_path, capsys):
    assert main(["fit", "--model", "ppca", "--dataset", "digits", "--channels", "3", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "the embedded dataset 'digits' is grayscale" in capsys.readouterr().err
