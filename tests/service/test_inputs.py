"""Bad input: a clear 4xx problem+json, never a 500, never a hang."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import image_bytes, settings_for, wait_ready

from service.app import create_app


def problem(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == status
    for w in words:
        assert w.lower() in body["detail"].lower(), (w, body["detail"])
    return body


def enc(client, files=None, **kw):
    return client.post("/encode?model=ppca-digits", files=files, **kw)


def test_unknown_model_and_path(client):
    problem(client.post("/encode?model=nope", json={"images": [[0.0] * 64]}), 404, "nope", "ppca-digits")
    problem(client.get("/models/nope"), 404, "nope")
    problem(client.get("/sample?model=nope"), 404)
    problem(client.get("/no/such/path"), 404)
    problem(client.put("/encode"), 405)


def test_not_an_image_truncated_corrupt(client):
    problem(enc(client, [("images", ("a.txt", b"hello, not an image", "text/plain"))]), 415, "png")
    good = image_bytes(np.random.default_rng(0).random((8, 8)))
    problem(enc(client, [("images", ("t.png", good[: len(good) // 2], "image/png"))]), 422, "t.png")
    jpg = image_bytes(np.random.default_rng(0).random((64, 64)), fmt="JPEG")
    problem(enc(client, [("images", ("t.jpg", jpg[:300], "image/jpeg"))]), 422)
    corrupt = bytearray(good)
    corrupt[40:60] = b"\x00" * 20
    r = enc(client, [("images", ("c.png", bytes(corrupt), "image/png"))])
    problem(r, r.status_code if r.status_code in (415, 422) else 422)  # header CRC broken: not identifiable
    problem(enc(client, [("images", ("e.png", b"", "image/png"))]), 422, "empty")
    # an unsupported format that Pillow knows (ICO)
    buf = io.BytesIO()
    Image.new("L", (16, 16)).save(buf, "ICO")
    problem(enc(client, [("images", ("x.ico", buf.getvalue(), "image/x-icon"))]), 415)


def test_media_types_and_empty_requests(client):
    problem(client.post("/encode?model=ppca-digits", content=b"abc", headers={"content-type": "text/plain"}), 415)
    problem(client.post("/encode?model=ppca-digits"), 415)
    problem(client.post("/encode?model=ppca-digits", content=b"", headers={"content-type": "application/json"}),
            422, "empty")
    problem(client.post("/encode?model=ppca-digits", json={"images": []}), 422, "no images")
    problem(client.post("/encode?model=ppca-digits", json={"imgs": [[0.0] * 64]}), 422, "images")
    problem(client.post("/encode?model=ppca-digits", json=[1, 2]), 422)
    problem(client.post("/encode?model=ppca-digits", content=b'{"images": [[0.1,', headers={
        "content-type": "application/json"}), 422, "json")
    problem(enc(client, [("other", ("a.png", image_bytes(np.zeros((8, 8))), "image/png"))]), 422, "images")
    problem(client.post("/encode?model=ppca-digits", data={"images": "text"},
                        files=[("x", ("a", b"1", "text/plain"))]), 422, "file")
    problem(client.post("/encode?model=ppca-digits", content=b"--x\r\nbroken",
                        headers={"content-type": "multipart/form-data"}), 400)


def test_json_image_values(client):
    bad = [
        ({"images": [[0.5] * 63]}, "64"),
        ({"images": [[[0.5] * 8] * 7 + [[0.5] * 7]]}, "rectangular"),
        ({"images": [[0.5] * 63 + [1.5]]}, "[0, 1]"),
        ({"images": [[0.5] * 63 + [-0.1]]}, "[0, 1]"),
        ({"images": [["a"] * 64]}, "number"),
        ({"images": [[[[0.5]]]]}, "numbers, got an array"),
        ({"images": [[[[0.5, 0.5, 0.5]] * 8] * 8]}, "numbers, got an array"),  # H x W x 3: not accepted
        ({"images": [[True] + [0.5] * 63]}, "numbers, got a boolean"),
        ({"images": [[[0.5] * 8] * 7 + [[0.5] * 7 + ["0.5"]]]}, "numbers, got a string"),
        ({"images": [5]}, "images.0"),
    ]
    for body, word in bad:
        problem(client.post("/encode?model=ppca-digits", json=body), 422, word)
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        payload = b'{"images": [[' + b"0.5," * 63 + token + b"]]}"
        problem(client.post("/encode?model=ppca-digits", content=payload,
                            headers={"content-type": "application/json"}), 422, "not valid json")


def test_too_many_images(client):
    problem(client.post("/encode?model=ppca-digits", json={"images": [[0.0] * 64] * 65}), 413, "64")
    files = [("images", (f"{i}.png", image_bytes(np.zeros((8, 8))), "image/png")) for i in range(65)]
    problem(enc(client, files), 413, "64")


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring a huge image, + a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + \
        chunk(b"IEND", b"")


def test_decompression_bombs(client):
    problem(enc(client, [("images", ("bomb.png", _png_header_only(100_000, 100_000), "image/png"))]), 413,
            "before decoding")
    # a real small file that expands to a large image: 5000 x 5000 zeros compress to ~25 kB
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 100_000
    problem(enc(client, [("images", ("zeros.png", buf.getvalue(), "image/png"))]), 413, "pixels")
    gif = io.BytesIO()
    Image.new("P", (4000, 4000)).save(gif, "GIF")
    problem(enc(client, [("images", ("big.gif", gif.getvalue(), "image/gif"))]), 413)


def test_decode_bad_latents(client):
    problem(client.post("/decode?model=ppca-digits", json={"z": [[0.0] * 4]}), 422, "latent_dim 5")
    problem(client.post("/decode?model=ppca-digits", json={"z": []}), 422)
    problem(client.post("/decode?model=ppca-digits", json={"z": [[1e9] * 5]}), 422, "|z|")
    problem(client.post("/decode?model=ppca-digits", json={"z": [["x"] * 5]}), 422)
    problem(client.post("/decode?model=ppca-digits", json={"z": [[0.0] * 5] * 65}), 413)
    for token in (b"NaN", b"Infinity"):
        problem(client.post("/decode?model=ppca-digits", content=b'{"z": [[0, 0, 0, 0, ' + token + b"]]}",
                            headers={"content-type": "application/json"}), 422)
    problem(client.post("/decode?model=ppca-digits", content=b"{bad json",
                        headers={"content-type": "application/json"}), 422)
    problem(client.post("/decode?model=ppca-digits", content=b""), 422, "empty")
    problem(client.post("/decode?model=ppca-digits", content=b'{"z": [[0, 0, 0, 0, 0]]}',
                        headers={"content-type": "text/plain"}), 415, "application/json")
    problem(client.post("/decode?model=ppca-digits&format=gif", json={"z": [[0.0] * 5]}), 422)
    problem(client.post("/decode?model=ppca-digits&format=png&scale=40", json={"z": [[0.0] * 5]}), 422)


@pytest.mark.parametrize("query", ["n=0", "n=257", "n=-1", "n=abc", "temperature=-1", "temperature=nan",
                                   "temperature=inf", "temperature=11", "seed=-1", "seed=99999999999999999999",
                                   "format=bmp", "scale=0"])
def test_sample_parameters_out_of_bounds(client, query):
    name = query.split("=")[0]
    body = problem(client.get(f"/sample?model=ppca-digits&{query}"), 422, name)
    if "errors" in body:  # the schema's bounds (the service's own limits, n <= 256 etc., say them in words)
        assert body["errors"][0]["loc"] == ["query", name]


def test_query_errors_name_the_parameter_on_every_inference_endpoint(client):
    png = [("images", ("a.png", image_bytes(np.zeros((8, 8))), "image/png"))]
    problem(client.post("/encode?model=ppca-digits&invert=maybe", files=png), 422, "query.invert")
    problem(client.post("/log-likelihood?model=ppca-digits&binarize=2", files=png), 422, "query.binarize")
    problem(client.post("/decode?model=ppca-digits&scale=x", json={"z": [[0.0] * 5]}), 422, "query.scale")
    problem(client.get("/sample?model=" + "m" * 201), 422, "query.model")


def test_log_likelihood_samples_out_of_bounds(client, need):
    name = need("vae-digits")
    body = {"images": [[0.0] * 64]}
    problem(client.post(f"/log-likelihood?model={name}&samples=0", json=body), 422)
    problem(client.post(f"/log-likelihood?model={name}&samples=5001", json=body), 422, "5000")
    problem(client.post(f"/log-likelihood?model={name}&samples=5000", json={"images": [[0.0] * 64] * 64}), 413)


def test_body_size_limit(model_repo):
    app = create_app(settings_for(model_repo, max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        big = {"images": [[0.0] * 64] * 40}  # ~10 kB
        problem(c.post("/encode?model=ppca-digits", json=big), 413, "4096")
        problem(c.post("/decode?model=ppca-digits", json={"z": [[0.0] * 5] * 500}), 413)

        def chunks():  # no Content-Length: streamed, counted as it arrives
            for _ in range(10):
                yield b"x" * 1000

        problem(c.post("/encode?model=ppca-digits", content=chunks(),
                       headers={"content-type": "application/json"}), 413)
        problem(c.post("/decode?model=ppca-digits", content=chunks(),
                       headers={"content-type": "application/json"}), 413)
        # under the limit still works
        assert c.post("/encode?model=ppca-digits", json={"images": [[0.0] * 64]}).status_code == 200
