"""Data loading: the embedded benchmark split and the user-data loaders on files written here."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from training.data import binarize, load_dataset, mnist5k_split
from training.user_data import DataError, load_idx, load_images


def _write_idx(path, arr: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(">u1" if code == 0x08 else ">f4").tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_mnist5k_bin_split_is_the_documented_one():
    train_idx, test_idx = mnist5k_split()
    assert list(train_idx[:5]) == [2221, 1222, 227, 4662, 3029]
    data = load_dataset("mnist5k-bin")
    assert data.image_shape == (28, 28) and data.binary
    assert (len(data.train), len(data.valid), len(data.test)) == (3600, 400, 1000)
    # The documented counts of ones: 410,374 over the 4,000 training rows, 104,224 over the test rows.
    assert data.train.sum() + data.valid.sum() == 410_374
    assert data.test.sum() == 104_224
    # Continuous intensities stay aligned with the binarized training rows.
    assert data.train_probs.shape == data.train.shape
    assert np.all(data.train[data.train_probs == 0] == 0)


def test_validation_rows_come_from_training_rows_only():
    cont = load_dataset("mnist5k")
    rows = {r.tobytes() for r in cont.test}
    assert not any(r.tobytes() in rows for r in cont.valid)
    assert not any(r.tobytes() in rows for r in cont.train)
    assert len(load_dataset("mnist5k", valid_fraction=0.0).train) == 4000


def test_digits_scaled_to_unit_interval():
    data = load_dataset("digits")
    assert data.image_shape == (8, 8)
    assert data.train.min() == 0.0 and data.train.max() == 1.0
    assert len(data.train) + len(data.valid) + len(data.test) == 1797


def test_binarize_is_seeded_and_matches_probabilities():
    x = np.full((2000, 10), 0.3)
    a, b = binarize(x, 5), binarize(x, 5)
    assert np.array_equal(a, b)
    assert abs(a.mean() - 0.3) < 0.01


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path, compress):
    arr = np.random.default_rng(0).integers(0, 256, (7, 10, 8), dtype=np.uint8)
    path = tmp_path / ("images-idx3-ubyte" + (".gz" if compress else ""))
    _write_idx(path, arr, compress=compress)
    assert np.array_equal(load_idx(path), arr)
    images = load_images(path)
    assert images.shape == (7, 10, 8) and np.allclose(images, arr / 255.0)


def test_idx_truncated_names_file_and_fault(tmp_path):
    arr = np.zeros((3, 4, 4), dtype=np.uint8)
    path = tmp_path / "bad-idx3-ubyte"
    _write_idx(path, arr)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"bad-idx3-ubyte.*declares shape \(3, 4, 4\)"):
        load_idx(path)
    path.write_bytes(b"\x01\x02\x08\x03")
    with pytest.raises(DataError, match="not an IDX file"):
        load_idx(path)


def test_npz_and_npy(tmp_path):
    arr = np.random.default_rng(0).random((6, 8, 8))
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", x=arr.reshape(6, 64), y=np.arange(6))
    assert np.allclose(load_images(tmp_path / "a.npy"), arr)
    assert np.allclose(load_images(tmp_path / "b.npz"), arr)
    np.save(tmp_path / "c.npy", arr * 3)
    with pytest.raises(DataError, match=r"c\.npy: float pixels must lie in \[0, 1\]"):
        load_images(tmp_path / "c.npy")
    np.save(tmp_path / "d.npy", np.zeros((4, 10)))
    with pytest.raises(DataError, match="not a square number"):
        load_images(tmp_path / "d.npy")
    (tmp_path / "e.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"e\.npy: not a readable \.npy"):
        load_images(tmp_path / "e.npy")


def test_image_folder_grayscale_and_resize(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "b.jpg")  # colour files: RGB by default
    assert load_images(folder, image_size=(8, 8)).shape == (2, 8, 8, 3)
    images = load_images(folder, image_size=(8, 8), channels=1)
    assert images.shape == (2, 8, 8)
    assert np.allclose(images[0], 1.0) and np.allclose(images[1], 0.0, atol=0.02)
    (folder / "c.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1 of 3 image files are not readable images: c\.png \("):
        load_images(folder)


def test_user_dataset_split_and_missing_path(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (50, 8, 8), dtype=np.uint8))
    data = load_dataset(tmp_path / "x.npy")
    assert data.image_shape == (8, 8) and len(data.test) == 10 and len(data.train) + len(data.valid) == 40
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.npz")


def test_folder_pixels_are_the_services_pixels(tmp_path):
    """16-bit and transparent files read as the service reads uploads (Pillow's plain "L" conversion would
    clip 16-bit values to 255 and drop the alpha channel)."""
    from service.images import decode_with_pillow, prepare

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65536, (12, 10), dtype=np.uint16)).save(folder / "a16.png")
    la = np.stack([rng.integers(0, 256, (12, 10)), rng.integers(0, 256, (12, 10))], -1).astype(np.uint8)
    Image.fromarray(la, mode="LA").save(folder / "b_alpha.png")
    Image.fromarray(rng.integers(0, 256, (24, 15), dtype=np.uint8), mode="L").save(folder / "c_big.png")
    images = load_images(folder)
    assert images.shape == (3, 12, 10)
    for got, f in zip(images, sorted(folder.iterdir()), strict=True):
        served = prepare(decode_with_pillow(f.read_bytes(), f.name, max_pixels=10**6), (12, 10), invert=False,
                         source=f.name).x
        np.testing.assert_allclose(got.reshape(-1), served, atol=1e-6)
    assert images[0].max() < 1.0 and images[0].std() > 0.2  # not clipped to white
