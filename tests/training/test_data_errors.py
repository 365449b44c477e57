"""Bad user data stops `python -m training fit` before any training, with exit status 2 and a message
that names the file, says what is wrong and what is expected (nothing is written to --out)."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.user_data import MIN_SIDE

ROOT = Path(__file__).resolve().parents[2]


def _fit_error(capsys, dataset: Path, tmp_path: Path, *extra: str, model: str = "vae") -> str:
    """Run `fit` on `dataset`; assert exit status 2, no output folder, and return the error message."""
    out = tmp_path / "run"
    code = main(["fit", "--model", model, "--dataset", str(dataset), "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a data error must stop the fit before anything is written"
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _gray(folder: Path, name: str, shape=(16, 16), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode="L").save(path)
    return path


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _fit_error(capsys, tmp_path / "empty", tmp_path)
    assert "empty: no images found (it is empty); expected image files ending in .png, .jpg" in err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    err = _fit_error(capsys, tmp_path / "notes", tmp_path)
    assert "notes: no images found (it holds 1 other files)" in err


def test_mixed_grayscale_and_colour_folder(tmp_path, capsys):
    folder = tmp_path / "mixed"
    for k in range(3):
        _gray(folder, f"g{k}.png", seed=k)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "red.jpg")
    err = _fit_error(capsys, folder, tmp_path)
    assert "mixes 3 grayscale images (g0.png, g1.png, g2.png) with 1 colour images (red.jpg); expected one kind" in err
    assert "convert the colour files to grayscale" in err
    # a palette image whose colours are all gray counts as grayscale
    (folder / "red.jpg").unlink()
    Image.fromarray(np.full((16, 16), 90, np.uint8), mode="L").convert("P").save(folder / "palette.gif")
    assert main(["fit", "--model", "ppca", "--method", "closed-form", "--latent-dim", "1", "--dataset", str(folder),
                 "--test-fraction", "0.25", "--valid-fraction", "0", "--out", str(tmp_path / "ok"), "--quiet",
                 "--no-export"]) == 0, capsys.readouterr().err


def test_unreadable_files_are_each_named(tmp_path, capsys):
    folder = tmp_path / "broken"
    good = _gray(folder, "good.png")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    (folder / "text.jpg").write_text("not a jpeg")
    err = _fit_error(capsys, folder, tmp_path)
    assert "2 of 3 image files are not readable images: text.jpg (" in err
    assert "; truncated.png (" in err and "good.png" not in err
    assert "expected complete PNG, JPEG" in err


def test_images_below_the_minimum_size(tmp_path, capsys):
    folder = tmp_path / "icons"
    for k in range(4):
        _gray(folder, f"ok{k}.png", seed=k)
    _gray(folder, "icon.png", shape=(MIN_SIDE - 1, 32))
    err = _fit_error(capsys, folder, tmp_path)
    assert f"1 images are below the minimum size of {MIN_SIDE}x{MIN_SIDE} pixels: icon.png ({MIN_SIDE - 1}x32)" in err
    (folder / "icon.png").unlink()
    err = _fit_error(capsys, folder, tmp_path, "--image-size", "4", "12")
    assert f"--image-size: images of 4x12 pixels are below the minimum size of {MIN_SIDE}x{MIN_SIDE}" in err
    np.save(tmp_path / "tiny.npy", np.zeros((20, 5, 5), np.uint8))
    err = _fit_error(capsys, tmp_path / "tiny.npy", tmp_path)
    assert "tiny.npy: images of 5x5 pixels are below the minimum size" in err
    np.save(tmp_path / "x.npy", np.zeros((20, 16, 16), np.uint8))
    err = _fit_error(capsys, tmp_path / "x.npy", tmp_path, "--image-size", "16", "12")
    assert "x.npy: --image-size resizes the images of a folder only; this file holds 16x16 images" in err


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((20, 70), np.uint8), "a 2-D array must hold square images flattened to N x (H*W); got 70 columns"),
    (np.zeros((20, 16, 16, 4), np.uint8), "RGBA images of shape [20, 16, 16, 4]; expected images [N, H, W]"),
    (np.zeros((20, 1, 16, 16), np.uint8), "an array of shape [20, 1, 16, 16] looks channels-first"),
    (np.zeros(20, np.uint8), "an array of shape [20]; expected images [N, H, W] or [N, H, W, 1] (grayscale), "
                             "[N, H, W, 3] (RGB, channels last)"),
    (np.zeros((0, 16, 16), np.uint8), "the array holds no images (shape [0, 16, 16])"),
    (np.full((20, 16, 16), 300, np.uint16), "integer pixels must lie in 0..255, got 300..300"),
    (np.full((20, 16, 16), 255.0), "float pixels must lie in [0, 1], got 255..255"),
    (np.full((20, 16, 16), np.nan), "the array holds NaN or infinite values"),
    (np.zeros((20, 16, 16), np.complex64), "unsupported array dtype complex64"),
    (np.full((20, 16, 16), "a"), "unsupported array dtype <U1"),
])
def test_arrays_of_a_wrong_shape_or_dtype(tmp_path, capsys, array, message):
    np.save(tmp_path / "x.npy", array)
    err = _fit_error(capsys, tmp_path / "x.npy", tmp_path)
    assert f"x.npy: {message}" in err


def test_npz_and_idx_errors(tmp_path, capsys):
    np.savez(tmp_path / "two.npz", a=np.zeros((20, 16, 16)), b=np.zeros(20))
    err = _fit_error(capsys, tmp_path / "two.npz", tmp_path)
    assert "two.npz: the .npz archive holds ['a', 'b']; expected one array or one named 'x'" in err
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 20, 16, 16)
    (tmp_path / "short-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(100)))
    err = _fit_error(capsys, tmp_path / "short-idx3-ubyte.gz", tmp_path)
    assert "short-idx3-ubyte.gz: IDX header declares shape (20, 16, 16) (5120 bytes of data)" in err


def test_too_few_rows_for_the_split(tmp_path, capsys):
    np.save(tmp_path / "three.npy", np.zeros((3, 16, 16), np.uint8))
    err = _fit_error(capsys, tmp_path / "three.npy", tmp_path)
    assert ("three.npy: 3 images are too few for a test fraction of 0.2 (1 rows) and a validation fraction of 0.1 "
            "(1 rows): 1 training rows would be left, and at least 2 are needed") in err
    np.save(tmp_path / "ten.npy", np.zeros((10, 16, 16), np.uint8))
    err = _fit_error(capsys, tmp_path / "ten.npy", tmp_path, "--test-fraction", "0.5", "--valid-fraction", "0.8")
    assert "10 images are too few for a test fraction of 0.5 (5 rows) and a validation fraction of 0.8 (4 rows)" in err
    # the VAEs select their epoch on validation rows: none asked for is a clear error too
    err = _fit_error(capsys, tmp_path / "ten.npy", tmp_path, "--valid-fraction", "0")
    assert "use --valid-fraction > 0" in err


def test_the_process_exits_2_with_the_message(tmp_path):
    """The same through `python -m training`: the exit status a shell script sees."""
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "training", "fit", "--model", "ppca", "--dataset",
                           str(tmp_path / "empty"), "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no images found (it is empty)" in proc.stderr and "Traceback" not in proc.stderr


def test_ppca_latent_dim_beyond_the_rows_says_so(tmp_path, capsys):
    np.save(tmp_path / "twelve.npy", np.random.default_rng(0).integers(0, 256, (12, 16, 16), dtype=np.uint8))
    code = main(["fit", "--model", "ppca", "--method", "closed-form", "--latent-dim", "10", "--dataset",
                 str(tmp_path / "twelve.npy"), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert ("the 9 training rows lie in a subspace of dimension <= latent_dim = 10: sigma2 would be 0 (N rows span "
            "at most N - 1 = 8 dimensions)") in capsys.readouterr().err
