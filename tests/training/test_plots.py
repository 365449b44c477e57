"""Image grids for any number of images: the reconstruction plot once assumed rows of exactly 8."""

import numpy as np
import pytest

from training import plots


def _stack(n: int, h: int = 3, w: int = 2, offset: float = 0.0) -> np.ndarray:
    return (np.arange(n * h * w, dtype=np.float64).reshape(n, h, w) + 1.0 + offset) / (10.0 * n * h * w)


@pytest.mark.parametrize("n", [1, 3, 7, 8, 10, 32])
def test_paired_rows_puts_each_image_above_its_partner(n):
    a, b = _stack(n), _stack(n, offset=0.5)
    pairs, ncols = plots.paired_rows(a, b, ncols=8)
    assert ncols == min(8, n)
    nrows = -(-n // ncols)
    assert pairs.shape == (2 * nrows * ncols, 3, 2)
    for k in range(n):
        r, c = divmod(k, ncols)
        assert np.array_equal(pairs[(2 * r) * ncols + c], a[k])
        assert np.array_equal(pairs[(2 * r + 1) * ncols + c], b[k])
    assert np.count_nonzero(pairs.reshape(len(pairs), -1).any(axis=1)) == 2 * n  # the rest are blank tiles


def test_image_grid_any_count_and_channels():
    grid = plots.image_grid(_stack(5, 4, 3), ncols=8)  # fewer images than columns: one short row
    assert grid.shape == (4, 5 * 3 + 4)
    assert plots.image_grid(_stack(1, 32, 24)).shape == (32, 24)
    rgb = np.random.default_rng(0).random((3, 4, 5, 3))
    grid = plots.image_grid(rgb, ncols=2)
    assert grid.shape == (2 * 4 + 1, 2 * 5 + 1, 3)
    assert np.array_equal(grid[5:9, 0:5], rgb[2])
    with pytest.raises(ValueError, match="one or more images"):
        plots.image_grid(np.zeros((0, 4, 4)))


def test_as_images_is_row_major():
    rows = np.arange(2 * 6).reshape(2, 6)
    assert np.array_equal(plots.as_images(rows, (2, 3))[1], [[6, 7, 8], [9, 10, 11]])


@pytest.mark.parametrize("n", [1, 5, 11])
def test_save_image_grid_writes_a_png(tmp_path, n):
    a = _stack(n, 32, 24)
    pairs, ncols = plots.paired_rows(a, a)
    path = plots.save_image_grid(pairs, tmp_path / "r.png", "t", ncols=ncols)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("model", "n"), [("vae", 50), ("flow-vae", 48), ("flow-vae", 57), ("vae", 5), ("ppca", 5)])
def test_fit_on_a_folder_writes_every_plot(tmp_path, model, n):
    """The reported crash: 50 random 32x32 PNGs (48 and 57 for flow-vae) broke the reconstruction plot; 5 images
    leave a single test row and a single validation row."""
    from PIL import Image

    from training.cli import main
    from training.common import read_json

    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(n)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(folder / f"{k:03d}.png")
    out = tmp_path / "run"
    small = (["--method", "em", "--iterations", "3", "--latent-dim", "2"] if model == "ppca" else
             ["--epochs", "2", "--hidden", "16", "--latent-dim", "2", "--eval-samples", "4"])
    assert main(["fit", "--model", model, "--dataset", str(folder), "--out", str(out), "--quiet", "--no-export",
                 *small]) == 0
    summary = read_json(out / "metrics.json")["dataset"]
    assert summary["n_train"] + summary["n_valid"] + summary["n_test"] == n
    if n == 5:
        assert (summary["n_valid"], summary["n_test"]) == (1, 1)
    pngs = ["samples.png", "directions.png"] if model == "ppca" else ["samples.png", "reconstructions.png", "elbo.png"]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
