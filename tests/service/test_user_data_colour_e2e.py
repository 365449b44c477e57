"""Colour user data end to end: a folder of colour images written here -> `python -m training fit` -> `export`
-> a live `python -m service`, over real HTTP.

Each model kind is fitted on a folder of RGB (and RGBA) PNG files and a JPEG, 16 x 12 pixels, whose channels
the fit takes from the data (3); a PPCA fitted with `--channels 1` on the same folder is the grayscale case.
The references are the fitted torch models of the checkpoints (and scipy's multivariate normal density for
PPCA's log-likelihood), fed with the pixels Pillow gives for the uploaded files (RGB, transparent pixels
composited onto white, gray repeated into RGB), never the service's own code.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from svc_helpers import start_server
from user_data_checks import check_log_likelihood

from model_repository.card import ModelRepositoryError, load_model_card
from training.cli import main
from training.common import load_checkpoint
from training.drivers import driver_for

SHAPE = (16, 12)  # H > W
TINY_VAE = ["--latent-dim", "3", "--hidden", "16", "--epochs", "3", "--batch-size", "8", "--eval-samples", "4",
            "--warmup-epochs", "1"]
# name -> fit arguments
MODELS = {
    "rgb-ppca": ["--model", "ppca", "--method", "em", "--latent-dim", "3", "--iterations", "5"],
    "rgb-vae": ["--model", "vae", *TINY_VAE],
    "rgb-flow-vae": ["--model", "flow-vae", "--flows", "2", *TINY_VAE],
    "gray-ppca": ["--model", "ppca", "--method", "closed-form", "--latent-dim", "3", "--channels", "1"],
}


def _pictures(n: int, seed: int) -> np.ndarray:
    """n uint8 RGB images [n, H, W, 3]: a blob of a random colour at a random place on a coloured ramp, plus noise."""
    rng = np.random.default_rng(seed)
    H, W = SHAPE
    r, c = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W, 3), np.uint8)
    for k in range(n):
        cy, cx, s = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(2, 4)
        blob = np.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * s * s))[..., None]
        ramp = np.stack([c / W, r / H, 1 - c / W], axis=-1)
        x = 0.7 * blob * rng.uniform(0.3, 1, 3) + 0.2 * ramp + 0.05 * rng.random((H, W, 3))
        out[k] = np.round(np.clip(x, 0, 1) * 255)
    return out


def _encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _rgba(rgb: np.ndarray, seed: int) -> Image.Image:
    alpha = np.random.default_rng(seed).integers(128, 256, rgb.shape[:2], dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


@pytest.fixture(scope="module")
def colour_repo(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(image folder, model repository, run folders) with every model of MODELS fitted and exported."""
    folder, repo = tmp_path_factory.mktemp("colourdata"), tmp_path_factory.mktemp("colourmodels")
    runs = tmp_path_factory.mktemp("colourruns")
    pictures = _pictures(14, 1)
    for k, im in enumerate(pictures[:11]):
        Image.fromarray(im).save(folder / f"p{k:02d}.png")
    _rgba(pictures[11], 11).save(folder / "q_alpha.png")
    _rgba(pictures[12], 12).save(folder / "r_alpha.png")
    Image.fromarray(pictures[13]).save(folder / "s.jpg", quality=92)
    for name, fit in MODELS.items():
        rc = main(["fit", *fit, "--dataset", str(folder), "--out", str(runs / name), "--no-export", "--quiet",
                   "--seed", "0"])
        assert rc == 0, f"fitting {name} failed"
        assert (runs / name / "samples.png").is_file()
        assert main(["export", str(runs / name), "--out", str(repo / name)]) == 0, f"exporting {name} failed"
    return folder, repo, runs


@pytest.fixture(scope="module")
def server(colour_repo, tmp_path_factory):
    _, repo, _ = colour_repo
    live = start_server(repo, tmp_path_factory.mktemp("colourlive") / "server.log", default_model="rgb-ppca")
    yield live
    live.stop()


def _model(runs: Path, name: str):
    ckpt = load_checkpoint(runs / name)
    return ckpt, driver_for(ckpt["kind"]).build_model(ckpt)


def _encode_ref(ckpt, model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        if ckpt["kind"] == "ppca":
            return model.posterior(torch.as_tensor(x, dtype=torch.float64))[0].numpy()
        return model.encode(torch.as_tensor(x, dtype=torch.float32))[0].numpy()


def _decode_ref(ckpt, model, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        if ckpt["kind"] == "ppca":
            return np.clip((model.mu + torch.as_tensor(z, dtype=torch.float64) @ model.W.T).numpy(), 0, 1)
        return np.clip(model.x_mean(torch.as_tensor(z, dtype=torch.float32)).numpy(), 0, 1)


def _check_colour_model(url: str, name: str, runs: Path, folder: Path) -> None:
    H, W = SHAPE
    D = H * W * 3
    ckpt, model = _model(runs, name)
    assert ckpt["meta"]["channels"] == 3 and model.config.data_dim == D
    upload = (folder / "p03.png").read_bytes()
    rgba = (folder / "q_alpha.png").read_bytes()
    with Image.open(io.BytesIO(upload)) as im:
        assert im.mode == "RGB"
        x = np.asarray(im, dtype=np.float64).reshape(1, D) / 255.0  # row-major, channels interleaved
    with Image.open(io.BytesIO(rgba)) as im:
        x_rgba = np.asarray(_on_white(im).convert("RGB"), dtype=np.float64).reshape(1, D) / 255.0
    gray_u8 = np.asarray(Image.open(io.BytesIO(upload)).convert("L"))
    x_gray = np.repeat(gray_u8[..., None], 3, axis=2).reshape(1, D) / 255.0  # Pillow's "RGB" of an "L" image
    q = {"model": name}
    with httpx.Client(base_url=url, timeout=30.0) as c:
        info = c.get(f"/models/{name}").json()
        assert info["channels"] == 3 and info["image_shape"] == [H, W] and info["data_dim"] == D, info
        assert info["card"]["channels"] == 3 and info["card"]["input"]["layout"] == "row-major HWC"

        # /encode: an RGB PNG, an RGBA PNG, a grayscale PNG, and the RGB one twice as large (resized)
        big = _encoded(Image.open(io.BytesIO(upload)).resize((2 * W, 2 * H)))
        gray = _encoded(Image.fromarray(gray_u8))
        r = c.post("/encode", params=q, files=[("images", ("a.png", upload, "image/png")),
                                               ("images", ("alpha.png", rgba, "image/png")),
                                               ("images", ("gray.png", gray, "image/png")),
                                               ("images", ("big.png", big, "image/png"))])
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        want = _encode_ref(ckpt, model, np.concatenate([x, x_rgba, x_gray]))
        for k in range(3):
            assert res[k]["original_shape"] == [H, W] and not res[k]["resized"]
            np.testing.assert_allclose(res[k]["mean"], want[k], atol=2e-4, rtol=1e-4)
        assert res[3]["original_shape"] == [2 * H, 2 * W] and res[3]["resized"]
        # the same pixels as JSON: H rows of W [R, G, B] pixels, and flat H * W * 3
        r = c.post("/encode", params=q, json={"images": [x.reshape(H, W, 3).tolist(), x[0].tolist()]})
        assert r.status_code == 200, r.text
        for got in r.json()["results"]:
            np.testing.assert_allclose(got["mean"], res[0]["mean"], atol=1e-6)
        r = c.post("/encode", params=q, json={"images": [x.reshape(H, W, 3)[..., 0].tolist()]})
        assert r.status_code == 422 and "a pixel of a colour model must be an array of 3 numbers" in r.text

        # /decode as JSON ([H][W][3] arrays) and as an RGB PNG of W x H pixels
        z = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]], dtype=np.float32)
        want_images = _decode_ref(ckpt, model, z).reshape(2, H, W, 3)
        r = c.post("/decode", params=q, json={"z": z.tolist()})
        assert r.status_code == 200, r.text
        assert r.json()["image_shape"] == [H, W] and r.json()["channels"] == 3
        np.testing.assert_allclose(np.asarray(r.json()["images"]), want_images, atol=2e-4)
        r = c.post("/decode", params={**q, "format": "png"}, json={"z": z[:1].tolist()})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        png = Image.open(io.BytesIO(r.content))
        assert png.mode == "RGB" and png.size == (W, H)
        assert np.abs(np.asarray(png).astype(int) - np.round(want_images[0] * 255)).max() <= 1

        # /sample: JSON with a seed, and the same draw as an RGB PNG grid (2 x 2 tiles, gray separators)
        r = c.get("/sample", params={**q, "n": 3, "seed": 7, "format": "json"})
        assert r.status_code == 200, r.text
        samples = np.asarray(r.json()["images"])
        assert samples.shape == (3, H, W, 3)
        np.testing.assert_allclose(samples, _decode_ref(ckpt, model, np.asarray(r.json()["z"])).reshape(3, H, W, 3),
                                   atol=2e-4)
        r = c.get("/sample", params={**q, "n": 3, "seed": 7, "scale": 1})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        grid_img = Image.open(io.BytesIO(r.content))
        assert grid_img.mode == "RGB"
        grid = np.asarray(grid_img)
        assert grid.shape == (2 * (H + 1) + 1, 2 * (W + 1) + 1, 3)
        for k, (top, left) in enumerate([(1, 1), (1, W + 2), (H + 2, 1)]):
            assert np.abs(grid[top:top + H, left:left + W].astype(int) - np.round(samples[k] * 255)).max() <= 1

        # /log-likelihood of the RGB PNG: exact for ppca, the seeded bound for the VAEs; bits/dim with D = H W 3
        check_log_likelihood(c, q, upload, ckpt, model, x, D)
        metrics = info["metrics"]
        run_metrics = json.loads((runs / name / "metrics.json").read_text())
        want_bpd = -(run_metrics["test_log_likelihood"] - D * math.log(256)) / (D * math.log(2))
        assert math.isclose(metrics["bits_per_dim"], want_bpd, rel_tol=1e-9)


def test_colour_models_over_http(colour_repo, server):
    folder, _, runs = colour_repo
    for name in ("rgb-ppca", "rgb-vae", "rgb-flow-vae"):
        _check_colour_model(server.url, name, runs, folder)


def test_a_grayscale_model_still_greys_colour_uploads(colour_repo, server):
    folder, _, runs = colour_repo
    H, W = SHAPE
    ckpt, model = _model(runs, "gray-ppca")
    assert ckpt["meta"]["channels"] == 1
    upload = (folder / "p05.png").read_bytes()
    x = np.asarray(Image.open(io.BytesIO(upload)).convert("L"), dtype=np.float64).reshape(1, H * W) / 255.0
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["gray-ppca"]["channels"] == 1 and models["gray-ppca"]["data_dim"] == H * W
        assert models["rgb-vae"]["channels"] == 3 and models["rgb-vae"]["data_dim"] == H * W * 3
        r = c.post("/encode", params={"model": "gray-ppca"}, files=[("images", ("a.png", upload, "image/png"))])
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["results"][0]["mean"], _encode_ref(ckpt, model, x)[0], atol=2e-4)
        # the OpenAPI schema states the layouts of the loaded models: flat D of 192 to 576 values, H x W, H x W x 3
        flat, rows, rgb_rows = c.get("/openapi.json").json()["components"]["schemas"]["ImagesJSON"]["properties"][
            "images"]["items"]["oneOf"]
        assert (flat["minItems"], flat["maxItems"]) == (H * W, H * W * 3)
        assert rows["items"]["items"]["type"] == "number" and rgb_rows["items"]["items"]["maxItems"] == 3
        r = c.get("/sample", params={"model": "gray-ppca", "n": 2, "seed": 1})
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).mode == "L"
        r = c.post("/decode", params={"model": "gray-ppca"}, json={"z": [[0.0, 0.0, 0.0]]})
        assert r.json()["channels"] == 1 and np.asarray(r.json()["images"]).shape == (1, H, W)


def test_cards_of_format_1_read_as_grayscale(colour_repo, tmp_path):
    import shutil

    _, repo, _ = colour_repo
    for name in ("gray-ppca", "rgb-ppca"):
        shutil.copytree(repo / name, tmp_path / name)
        card = json.loads((tmp_path / name / "card.json").read_text())
        assert card["format_version"] == 2 and card["channels"] == (1 if name == "gray-ppca" else 3)
        del card["channels"]
        (tmp_path / name / "card.json").write_text(json.dumps(dict(card, format_version=1)))
    assert load_model_card(tmp_path / "gray-ppca").channels == 1
    with pytest.raises(ModelRepositoryError, match=r"data_dim 576 != H \* W \* C = 16 \* 12 \* 1 = 192"):
        load_model_card(tmp_path / "rgb-ppca")
    card = json.loads((tmp_path / "rgb-ppca" / "card.json").read_text())
    (tmp_path / "rgb-ppca" / "card.json").write_text(json.dumps(dict(card, format_version=2)))
    with pytest.raises(ModelRepositoryError, match="missing field 'channels'"):
        load_model_card(tmp_path / "rgb-ppca")
    (tmp_path / "rgb-ppca" / "card.json").write_text(json.dumps(dict(card, format_version=2, channels=2)))
    with pytest.raises(ModelRepositoryError, match=r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"):
        load_model_card(tmp_path / "rgb-ppca")
