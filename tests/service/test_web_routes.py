"""The web page's routes without a browser: POST /preprocess against /log-likelihood and /encode, the
Content-Security-Policy of every page, local docs assets, and what the API key guards
(the page itself in a real browser: test_web_page.py)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import image_bytes, settings_for, wait_ready

from service.app import create_app


def _csp(response) -> dict[str, str]:
    return {d.split()[0]: d for d in (p.strip() for p in response.headers["content-security-policy"].split(";")) if d}


def test_every_page_and_asset_is_served_under_a_csp_without_inline_scripts(client):
    for path in ("/", "/docs", "/redoc", "/ui/main.js", "/ui/app.css", "/ui/vendor/swagger-ui-bundle.js",
                 "/ui/vendor/redoc.standalone.js"):
        r = client.get(path)
        assert r.status_code == 200, path
        csp = _csp(r)
        assert csp["default-src"] == "default-src 'self'" and csp["script-src"] == "script-src 'self'", path
        assert "unsafe" not in csp["script-src"] and csp["connect-src"] == "connect-src 'self'", path
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert "unsafe-inline" not in _csp(client.get("/"))["style-src"]
    assert "unsafe-inline" not in _csp(client.get("/docs"))["style-src"]
    assert client.head("/").status_code == 200
    etag = client.get("/ui/main.js").headers["etag"]
    again = client.get("/ui/main.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc"])
def test_pages_load_only_local_scripts_and_stylesheets(client, path):
    html = client.get(path).text
    assert "<script>" not in html and " style=" not in html and "<style" not in html  # nothing inline
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not re.match(r"^[a-z]+:|^//", ref) for ref in refs if ref not in ("docs", "redoc")), refs
    for ref in refs:
        assert client.get("/" + ref).status_code == 200, ref


def test_the_page_is_open_and_the_api_needs_the_key(model_repo):
    app = create_app(settings_for(model_repo, api_key="s3cret"))
    with TestClient(app) as c:
        wait_ready(c)
        for path in ("/", "/docs", "/redoc", "/ui/main.js", "/ui/vendor/swagger-ui.css"):
            assert c.get(path).status_code == 200, path
        for path in ("/models", "/openapi.json", "/ui/../models", "/ui/%2e%2e/models", "/ui", "/uimodels"):
            r = c.get(path)
            assert r.status_code in (401, 404) and "default_model" not in r.text, (path, r.status_code, r.text)
        assert c.post("/preprocess", files={"images": ("a.png", b"x")}).status_code == 401
        assert c.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_preprocess_gives_the_pixels_that_log_likelihood_evaluates(client, need, digits):
    """A 16 x 16 upload, resized and binarized: /log-likelihood of the file and of /preprocess's pixels sent
    back as JSON are the same figures, and x is the model's binary input."""
    model = need("vae-digits")
    big = np.kron(digits.test[3].reshape(8, 8), np.ones((2, 2)))  # 16 x 16
    png = image_bytes(big)
    r = client.post(f"/preprocess?model={model}", files={"images": ("d.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["binarized"] is True and body["image_shape"] == [8, 8] and body["likelihood"] == "bernoulli"
    res = body["results"][0]
    assert res["resized"] is True and res["original_shape"] == [16, 16] and res["source"] == "d.png"
    x = np.asarray(res["x"], dtype=np.float32)
    assert x.shape == (8, 8) and set(np.unique(x)) <= {0.0, 1.0} and 0 < x.sum() < 64
    params = {"model": model, "samples": 20, "seed": 3}
    by_file = client.post("/log-likelihood", params=params, files={"images": ("d.png", png, "image/png")}).json()
    by_json = client.post("/log-likelihood", params=params, json={"images": [res["x"]]}).json()
    for key in ("elbo", "iw_bound", "bits_per_dim"):
        assert by_file["results"][0][key] == by_json["results"][0][key], key
    gray = client.post(f"/preprocess?model={model}&binarize=false", files={"images": ("d.png", png)}).json()
    assert gray["binarized"] is False
    np.testing.assert_array_equal(np.asarray(gray["results"][0]["x"], np.float32) >= 0.5, x == 1.0)


def test_preprocess_inverts_and_keeps_gaussian_intensities(client):
    """PPCA (Gaussian): no binarization; invert=true is 1 - x of the same image; the encoding of the file and of
    the pixels agree."""
    pixels = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    png = image_bytes(pixels)
    plain = client.post("/preprocess?model=ppca-digits", files={"images": ("g.png", png)}).json()
    inverted = client.post("/preprocess?model=ppca-digits&invert=true", files={"images": ("g.png", png)}).json()
    x, xi = (np.asarray(a["results"][0]["x"], np.float32) for a in (plain, inverted))
    assert plain["binarized"] is False and inverted["inverted"] is True and plain["results"][0]["resized"] is False
    np.testing.assert_array_equal(x, np.round(pixels * 255) / np.float32(255))
    np.testing.assert_array_equal(xi, np.float32(1) - x)
    by_file = client.post("/encode?model=ppca-digits&invert=true", files={"images": ("g.png", png)}).json()
    by_json = client.post("/encode?model=ppca-digits", json={"images": [inverted["results"][0]["x"]]}).json()
    assert by_file["results"][0]["mean"] == by_json["results"][0]["mean"]


@pytest.mark.parametrize(("files", "status", "words"), [
    ({"images": ("notes.png", b"not an image at all")}, 415, "not a PNG, JPEG"),
    ({"images": ("empty.png", b"")}, 422, "empty"),
    ({"other": ("a.png", b"x")}, 422, "named 'images'"),
])
def test_preprocess_refuses_bad_files_as_the_other_endpoints_do(client, files, status, words):
    r = client.post("/preprocess", files=files)
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
    assert words in r.json()["detail"]
    assert client.post("/encode", files=files).json()["detail"] == r.json()["detail"]


def test_preprocess_is_documented_and_answers_as_documented(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/preprocess"]["post"]
    assert {p["name"] for p in op["parameters"]} == {"model", "invert", "binarize"}
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert op["responses"]["415"]["content"]["application/problem+json"]
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (200, 10, 10)).save(buf, format="PNG")
    r = client.post("/preprocess?model=ppca-digits", files={"images": ("c.png", buf.getvalue())})
    assert r.status_code == 200 and r.json()["results"][0]["original_shape"] == [7, 5]
    assert set(r.json()) == set(spec["components"]["schemas"]["PreprocessResponse"]["properties"])


def test_the_installed_package_carries_every_file_of_the_page():
    """pyproject.toml's package-data globs cover service/web/ (a wheel, and so the Docker image, holds no file
    they miss)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    service = root / "service"
    files = {p for p in (service / "web").rglob("*") if p.is_file()}
    covered = {p for g in globs for p in service.glob(g) if p.is_file()}
    assert files and files == covered, sorted(str(p) for p in files - covered)
