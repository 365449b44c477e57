"""User data end to end: files written here -> `python -m training fit` -> `export` -> a live `python -m service`.

For each format (an image folder of PNG and JPEG files of mixed sizes, IDX files gzipped and not, .npy and
.npz arrays of uint8 and float pixels) each model kind is fitted for a few epochs or iterations, exported
into one shared model repository and queried over real HTTP: /encode with a PNG upload, /decode, /sample
and /log-likelihood, at non-square sizes (H != W both ways) and 16x16. The references are the fitted torch
models of the checkpoints (and, for PPCA's log-likelihood, scipy's multivariate normal density), fed with
the pixels of the uploaded files as Pillow reads them, never the service's own code.

The datasets are small on purpose: 13 folder images leave 3 test rows and a single validation row, so the
plots and figures of every fit are made from short rows too.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from svc_helpers import start_server
from user_data_checks import check_log_likelihood

from training.cli import main
from training.common import load_checkpoint
from training.drivers import driver_for

TINY_VAE = ["--latent-dim", "3", "--hidden", "16", "--epochs", "3", "--batch-size", "8", "--eval-samples", "4",
            "--warmup-epochs", "1"]
FITS = {
    "ppca-em": ["--model", "ppca", "--method", "em", "--latent-dim", "3", "--iterations", "5"],
    "ppca-cf": ["--model", "ppca", "--method", "closed-form", "--latent-dim", "3"],
    "vae": ["--model", "vae", *TINY_VAE],
    "flow-vae": ["--model", "flow-vae", "--flows", "2", *TINY_VAE],
}
FOLDER_SHAPE = (32, 24)  # H > W
IDX_SHAPE = (16, 16)
ARRAY_SHAPE = (12, 20)  # H < W
# name -> (dataset file or folder under the data root, fit arguments, extra `fit` arguments)
MODELS = {
    "folder-ppca": ("folder", "ppca-em", ["--image-size", *map(str, FOLDER_SHAPE)]),
    "folder-vae": ("folder", "vae", ["--image-size", *map(str, FOLDER_SHAPE)]),
    "folder-flow-vae": ("folder", "flow-vae", ["--image-size", *map(str, FOLDER_SHAPE)]),
    "idx-ppca": ("train-images-idx3-ubyte.gz", "ppca-cf", []),
    "idx-vae": ("train-images-idx3-ubyte", "vae", []),
    "idx-flow-vae": ("train-images-idx3-ubyte.gz", "flow-vae", []),
    "npy-u8-ppca": ("u8.npy", "ppca-cf", []),
    "npz-u8-ppca": ("u8.npz", "ppca-em", []),
    "npz-float-vae": ("float.npz", "vae", []),
    "npy-float-flow-vae": ("float.npy", "flow-vae", []),
}


def _pictures(n: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """n uint8 images [n, H, W]: a bright blob at a random place on a dim ramp, plus noise."""
    rng = np.random.default_rng(seed)
    H, W = shape
    r, c = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W), np.uint8)
    for k in range(n):
        cy, cx, s = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(2, 5)
        blob = np.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * s * s))
        x = 0.8 * blob + 0.15 * c / W + 0.05 * rng.random((H, W))
        out[k] = np.round(np.clip(x, 0, 1) * 255)
    return out


def _write_idx(path: Path, arr: np.ndarray) -> None:
    payload = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _write_data(root: Path) -> None:
    folder = root / "folder"
    (folder / "more").mkdir(parents=True)  # images in subfolders count too
    for k, im in enumerate(_pictures(7, FOLDER_SHAPE, 1)):
        Image.fromarray(im, mode="L").save(folder / f"p{k}.png")
    for k, im in enumerate(_pictures(6, FOLDER_SHAPE, 2)):  # JPEGs of other sizes, resized by --image-size
        size = [(30, 40), (48, 64), (36, 36)][k % 3]  # (width, height)
        Image.fromarray(im, mode="L").resize(size).save(folder / "more" / f"j{k}.jpeg", quality=90)
    idx = _pictures(30, IDX_SHAPE, 3)
    _write_idx(root / "train-images-idx3-ubyte", idx)
    _write_idx(root / "train-images-idx3-ubyte.gz", idx)
    u8 = _pictures(21, ARRAY_SHAPE, 4)
    np.save(root / "u8.npy", u8)
    np.savez(root / "u8.npz", x=u8.reshape(len(u8), ARRAY_SHAPE[0], ARRAY_SHAPE[1], 1))  # channels-last, C = 1
    f = _pictures(21, ARRAY_SHAPE, 5).astype(np.float32) / 255.0
    np.save(root / "float.npy", f)
    np.savez(root / "float.npz", images=f)


@pytest.fixture(scope="module")
def user_repo(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, model repository, run folders) with every model of MODELS fitted and exported."""
    root, repo = tmp_path_factory.mktemp("userdata"), tmp_path_factory.mktemp("usermodels")
    runs = tmp_path_factory.mktemp("userruns")
    _write_data(root)
    for name, (dataset, fit, extra) in MODELS.items():
        rc = main(["fit", *FITS[fit], *extra, "--dataset", str(root / dataset), "--out", str(runs / name),
                   "--no-export", "--quiet", "--seed", "0"])
        assert rc == 0, f"fitting {name} failed"
        plots = ["samples.png"] + (["directions.png"] if fit.startswith("ppca") else ["reconstructions.png"])
        assert all((runs / name / png).is_file() for png in plots) and not (runs / name / "card.json").exists()
        assert main(["export", str(runs / name), "--out", str(repo / name)]) == 0, f"exporting {name} failed"
    return root, repo, runs


@pytest.fixture(scope="module")
def server(user_repo, tmp_path_factory):
    _, repo, _ = user_repo
    live = start_server(repo, tmp_path_factory.mktemp("userlive") / "server.log", default_model="idx-ppca")
    yield live
    live.stop()


def _png(pixels_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels_u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _check_model(url: str, name: str, runs: Path, upload: bytes, shape: tuple[int, int]) -> None:
    """Every inference endpoint of model `name` over HTTP against its torch checkpoint."""
    H, W = shape
    ckpt = load_checkpoint(runs / name)
    model = driver_for(ckpt["kind"]).build_model(ckpt)
    assert ckpt["meta"]["image_shape"] == [H, W]
    with Image.open(io.BytesIO(upload)) as im:
        assert im.size == (W, H)  # Pillow sizes are (width, height)
        x = np.asarray(im, dtype=np.float64).reshape(1, H * W) / 255.0
    q = {"model": name}
    with httpx.Client(base_url=url, timeout=30.0) as c:
        info = c.get(f"/models/{name}").json()
        assert info["image_shape"] == [H, W] and info["data_dim"] == H * W, info

        # /encode: a PNG upload at the model's size, and one twice as large (resized by the service)
        big = _png(np.asarray(Image.open(io.BytesIO(upload)).resize((2 * W, 2 * H))))
        r = c.post("/encode", params=q, files=[("images", ("a.png", upload, "image/png")),
                                               ("images", ("big.png", big, "image/png"))])
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert res[0]["original_shape"] == [H, W] and not res[0]["resized"]
        assert res[1]["original_shape"] == [2 * H, 2 * W] and res[1]["resized"]
        with torch.no_grad():
            if ckpt["kind"] == "ppca":
                want, _ = model.posterior(torch.as_tensor(x))
            else:
                want = model.encode(torch.as_tensor(x, dtype=torch.float32))[0]
        np.testing.assert_allclose(res[0]["mean"], want.numpy()[0], atol=2e-4, rtol=1e-4)
        # the same pixels as JSON: H rows of W numbers, and flat (row-major)
        r = c.post("/encode", params=q, json={"images": [x.reshape(H, W).tolist(), x[0].tolist()]})
        assert r.status_code == 200, r.text
        for got in r.json()["results"]:
            assert got["original_shape"] == [H, W] and not got["resized"]
            np.testing.assert_allclose(got["mean"], res[0]["mean"], atol=1e-6)

        # /decode as JSON ([H][W] arrays, row-major) and as a PNG of W x H pixels
        z = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]], dtype=np.float32)
        with torch.no_grad():
            if ckpt["kind"] == "ppca":
                x_mean = (model.mu + torch.as_tensor(z, dtype=torch.float64) @ model.W.T).numpy()
            else:
                x_mean = model.x_mean(torch.as_tensor(z)).numpy()
        want_images = np.clip(x_mean, 0, 1).reshape(2, H, W)
        r = c.post("/decode", params=q, json={"z": z.tolist()})
        assert r.status_code == 200, r.text
        assert r.json()["image_shape"] == [H, W]
        got = np.asarray(r.json()["images"])
        assert got.shape == (2, H, W)
        np.testing.assert_allclose(got, want_images, atol=2e-4)
        r = c.post("/decode", params={**q, "format": "png"}, json={"z": z[:1].tolist()})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        png = np.asarray(Image.open(io.BytesIO(r.content)))
        assert png.shape == (H, W)
        assert np.abs(png.astype(int) - np.round(want_images[0] * 255)).max() <= 1

        # /sample: JSON with a seed, and the same draw as a PNG grid (2 x 2 tiles, 1-pixel gray separators)
        r = c.get("/sample", params={**q, "n": 3, "seed": 7, "format": "json"})
        assert r.status_code == 200, r.text
        body = r.json()
        with torch.no_grad():
            if ckpt["kind"] == "ppca":
                xs = model.mu + torch.as_tensor(np.asarray(body["z"]), dtype=torch.float64) @ model.W.T
            else:
                xs = model.x_mean(torch.as_tensor(np.asarray(body["z"]), dtype=torch.float32))
        samples = np.asarray(body["images"])
        assert samples.shape == (3, H, W)
        np.testing.assert_allclose(samples, np.clip(xs.numpy(), 0, 1).reshape(3, H, W), atol=2e-4)
        r = c.get("/sample", params={**q, "n": 3, "seed": 7, "scale": 1})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        grid = np.asarray(Image.open(io.BytesIO(r.content)))
        assert grid.shape == (2 * (H + 1) + 1, 2 * (W + 1) + 1)
        for k, (top, left) in enumerate([(1, 1), (1, W + 2), (H + 2, 1)]):
            assert np.abs(grid[top:top + H, left:left + W].astype(int) - np.round(samples[k] * 255)).max() <= 1

        # /log-likelihood of the uploaded PNG: exact for ppca, the seeded bound for the VAEs
        check_log_likelihood(c, q, upload, ckpt, model, x, H * W)


def test_image_folder_png_and_jpeg_resized(user_repo, server, capsys):
    root, _, runs = user_repo
    upload = (root / "folder" / "p3.png").read_bytes()
    for name in ("folder-ppca", "folder-vae", "folder-flow-vae"):
        _check_model(server.url, name, runs, upload, FOLDER_SHAPE)
    summary = load_checkpoint(runs / "folder-vae")["meta"]["dataset_summary"]
    assert (summary["n_train"], summary["n_valid"], summary["n_test"]) == (9, 1, 3)
    # `evaluate` reloads the same split at the fitted --image-size and reproduces the fit's test figure
    capsys.readouterr()
    assert main(["evaluate", str(runs / "folder-vae"), "--samples", "4", "--seed", "0"]) == 0
    figures = json.loads(capsys.readouterr().out)
    metrics = json.loads((runs / "folder-vae" / "metrics.json").read_text())
    assert figures["n_test"] == 3
    assert figures["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"], rel=1e-6)


def test_idx_gzipped_and_not(user_repo, server):
    root, _, runs = user_repo
    upload = _png(_pictures(30, IDX_SHAPE, 3)[0])
    for name in ("idx-ppca", "idx-vae", "idx-flow-vae"):
        _check_model(server.url, name, runs, upload, IDX_SHAPE)


def test_npy_and_npz_uint8_and_float(user_repo, server):
    root, _, runs = user_repo
    upload = _png(_pictures(21, ARRAY_SHAPE, 4)[5])
    for name in ("npy-u8-ppca", "npz-u8-ppca", "npz-float-vae", "npy-float-flow-vae"):
        _check_model(server.url, name, runs, upload, ARRAY_SHAPE)
