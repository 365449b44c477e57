"""Hostile request bodies over real HTTP (issue 11, points 1, 2, 10): never a 5xx, always a problem+json
that is valid UTF-8 JSON, and the pixel budgets checked before decoding. Plus property-based mutation of
raw JSON and multipart bodies (hypothesis)."""

from __future__ import annotations

import io
import json
import threading

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from svc_helpers import image_bytes

INFERENCE = ("/encode", "/decode", "/log-likelihood")


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def problem(r: httpx.Response, status: int | tuple[int, ...], slug: str | None = None) -> dict:
    """Assert a problem+json answer with `status`; its body must parse as strict UTF-8 JSON."""
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/problem+json"
    body = json.loads(r.content.decode("utf-8"))  # strict: no lone surrogates, valid UTF-8
    assert body["status"] == r.status_code and body["detail"]
    if slug is not None:
        assert body["type"] == f"/problems/{slug}", body
    return body


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "XbOuNdArY") -> tuple[bytes, str]:
    """A multipart/form-data body from (Content-Disposition parameters, data) pairs, written by hand."""
    out = b""
    for disposition, data in parts:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def digit_png() -> bytes:
    return image_bytes(np.random.default_rng(0).random((8, 8)))


# ------------------------------------------------------------------------------------------------
# The 5xx requests of the issue, one by one
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", INFERENCE)
def test_json_nested_100000_levels(http, path):
    body = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if path == "/decode":
        body = b'{"z": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    problem(http.post(path, content=body, headers={"content-type": "application/json"}), (413, 422))
    # within the parser's depth but deeper than any image: a clear 422 naming the array
    inner = b"[" * 500 + b"0" + b"]" * 500
    p = problem(http.post("/encode", content=b'{"images": [' + inner + b"]}",
                          headers={"content-type": "application/json"}), 422)
    assert "numbers" in p["detail"]


def test_json_number_of_5000_digits(http):
    for number in (b"1" * 5000, b"0." + b"1" * 5000, b"1" + b"0" * 4400 + b".5"):
        body = b'{"images": [[' + number + b"] ]}"
        problem(http.post("/encode", content=body, headers={"content-type": "application/json"}), 422)
    p = problem(http.post("/decode", content=b'{"z": [[' + b"9" * 5000 + b", 0, 0, 0, 0]]}",
                          headers={"content-type": "application/json"}), 422)
    assert "JSON" in p["detail"]


def test_integer_too_large_for_a_float(http):
    big = str(10**400).encode()
    row = b"[" + b", ".join([big] + [b"0"] * 7) + b"]"
    body = b'{"images": [[' + b", ".join([row] * 8) + b"]]}"
    for path in ("/encode", "/log-likelihood"):
        problem(http.post(path, content=body, headers={"content-type": "application/json"}), 422)
    # an integer beyond 64 bits but within float range: a pixel value out of [0, 1]
    body = json.dumps({"images": [[2**70] + [0] * 63]}).encode()
    problem(http.post("/encode", content=body, headers={"content-type": "application/json"}), 422,
            "invalid-pixel-values")


@pytest.mark.parametrize("charset", ["idna", "utf-7", "rot13", "nonsense", "utf-16", "raw_unicode_escape",
                                     "unicode_escape", "punycode", "undefined", "x\u00e9"])
def test_rfc2231_parameters_in_odd_charsets(http, charset):
    png = digit_png()
    # filename*= in an odd charset: ignored, the plain filename (if any) stays
    body, ctype = multipart_body([(f"name=images; filename=\"a.png\"; filename*={charset}''%ED%A0%80%00%5Cud800",
                                   png)])
    r = http.post("/encode", content=body, headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["source"] == "a.png"
    # boundary*= in an odd charset: no usable boundary, a 400
    body, _ = multipart_body([("name=images; filename=\"a.png\"", png)])
    r = http.post("/encode", content=body,
                  headers={"content-type": f"multipart/form-data; boundary*={charset}''XbOuNdArY".encode("latin-1")})
    problem(r, 400, "malformed-multipart")


@pytest.mark.parametrize("encoded", ["%5Cud800.png", "+2AA-.png"])
def test_charset_decoding_to_lone_surrogates(http, encoded):
    for charset in ("raw_unicode_escape", "unicode_escape", "utf-7", "utf-16-le"):
        disposition = f"name=images; filename*={charset}''{encoded}"
        good, ctype = multipart_body([(disposition, digit_png())])
        r = http.post("/encode", content=good, headers={"content-type": ctype})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert json.loads(r.content.decode("utf-8"))["results"][0]["source"] == "images[0]"
        bad, ctype = multipart_body([(disposition, b"not an image")])
        problem(http.post("/encode", content=bad, headers={"content-type": ctype}), 415)
    # a file name that really is UTF-8 comes back as it was sent
    body, ctype = multipart_body([("name=images; filename*=UTF-8''caf%C3%A9%20%F0%9F%98%80.png", digit_png())])
    assert http.post("/encode", content=body, headers={"content-type": ctype}).json()["results"][0][
        "source"] == "caf\u00e9 \U0001f600.png"


def test_decode_body_of_two_million_tiny_rows(http):
    body = b'{"z": [' + b"[0]," * 2_000_000 + b"[0]]}"
    p = problem(http.post("/decode", content=body, headers={"content-type": "application/json"}), 413,
                "too-many-values")
    assert "arrays" in p["detail"]
    # one long row instead: the values are counted, too
    body = b'{"z": [[' + b"0," * 1_000_000 + b"0]]}"
    problem(http.post("/decode", content=body, headers={"content-type": "application/json"}), 413, "too-many-values")


def test_json_images_have_a_pixel_cap(http):
    """1400 x 1400 JSON values: refused (413) from a count of the body before it is parsed. 500 x 500 (within
    max_json_pixels, 262,144 by default): parsed and resized in a worker, and answered."""
    big = np.zeros((1400, 1400), dtype=int)
    body = b'{"images": [' + json.dumps(big.tolist()).encode() + b"]}"
    p = problem(http.post("/encode", content=body, headers={"content-type": "application/json"}), 413,
                "too-many-pixels")
    assert "262144" in p["detail"]
    side = 500
    image = np.zeros((side, side), dtype=int)
    image[100:400, 200:300] = 1
    r = http.post("/encode", content=b'{"images": [' + json.dumps(image.tolist()).encode() + b"]}",
                  headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["original_shape"] == [side, side] and r.json()["results"][0]["resized"]


def test_too_many_json_values_refused_as_the_body_arrives(live):
    """A JSON body with too many values is answered 413 once the chunk past the limit has arrived, before the
    client has sent the rest; the rest is then discarded and the connection serves the next request."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(live.url)
    head_of_body = b'{"images": [[' + b"0," * 300_000  # past max_json_pixels (262,144 values)
    total = 6 * len(head_of_body)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % total + head_of_body)
        s.settimeout(10)  # the answer comes without the other five sixths of the body
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
        assert b"too-many-pixels" in reply
        s.sendall(b" " * (total - len(head_of_body)))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"HTTP/1.1 200" not in reply:
            chunk = s.recv(65536)
            assert chunk, "the server closed the connection instead of answering the next request"
            reply += chunk


def test_many_bilevel_pngs_refused_from_their_declared_sizes(http):
    buf = io.BytesIO()
    Image.new("1", (2048, 2048)).save(buf, format="PNG")
    png = buf.getvalue()
    assert len(png) < 1000  # 64 of them fit in a small request
    body, ctype = multipart_body([(f'name=images; filename="b{i}.png"', png) for i in range(64)])
    p = problem(http.post("/encode", content=body, headers={"content-type": ctype}), 413, "too-many-pixels")
    assert str(64 * 2048 * 2048) in p["detail"]
    # two of them (8,388,608 pixels) are within the default budget: decoded (in a worker) and answered
    body, ctype = multipart_body([(f'name=images; filename="b{i}.png"', png) for i in range(2)])
    assert http.post("/encode", content=body, headers={"content-type": ctype}).status_code == 200


@pytest.mark.parametrize("pixel", ['"0.5"', "true", "false", "null", "{}", '"1"'])
def test_json_pixels_must_be_numbers(http, pixel):
    flat = ", ".join(["0"] * 63 + [pixel])
    for images in (f"[[{flat}]]", "[[" + ", ".join([f"[{', '.join(['0'] * 7 + [pixel])}]"] * 8) + "]]"):
        p = problem(http.post("/encode", content=f'{{"images": {images}}}'.encode(),
                              headers={"content-type": "application/json"}), 422, "invalid-pixel-values")
        assert "numbers" in p["detail"]
    problem(http.post("/decode", content=f'{{"z": [[0, 0, 0, 0, {pixel}]]}}'.encode(),
                      headers={"content-type": "application/json"}), 422)


@pytest.mark.parametrize("bits", [16, 32])
def test_deep_images_are_scaled_by_their_type_range(http, bits):
    """A dim 16- or 32-bit image (its maximum a sixtieth of its type's) encodes as the JSON image of its
    values / the type's largest value (65535; 2**31 - 1 for Pillow's signed 32-bit TIFF)."""
    top = 65535 if bits == 16 else 2**31 - 1
    rng = np.random.default_rng(bits)
    a = rng.integers(0, top // 60, size=(8, 8), endpoint=True)
    a[0, 0] = top // 60
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16 if bits == 16 else np.int32)).save(buf, format="PNG" if bits == 16 else "TIFF")
    r = http.post("/encode", files=[("images", ("dim", buf.getvalue(), "application/octet-stream"))])
    want = http.post("/encode", json={"images": [(a / top).tolist()]})
    assert r.status_code == want.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["results"][0]["mean"], want.json()["results"][0]["mean"], rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Where the work runs: on the event loop up to INLINE_PIXELS, in a worker beyond it
# ------------------------------------------------------------------------------------------------


def test_decoding_beyond_the_inline_budget_runs_off_the_event_loop(client, monkeypatch):
    import asyncio

    from service import images as img
    from service import inputs

    seen: list[tuple[str, bool]] = []
    for name in ("decode_plain_png", "decode_image", "json_image"):
        original = getattr(img, name)

        def spy(*a, _original=original, _name=name, **k):
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            seen.append((_name, on_loop))
            return _original(*a, **k)

        monkeypatch.setattr(img, name, spy)
    side = int(np.sqrt(inputs.INLINE_PIXELS)) + 1  # one image just over the inline budget
    cases = [
        (digit_png(), [("decode_plain_png", True)]),  # plain 8-bit gray: libspng on the loop
        (image_bytes(np.zeros((8, 8)), mode="RGB"), [("decode_plain_png", True), ("decode_image", False)]),
        (image_bytes(np.zeros((8, 8)), fmt="BMP"), [("decode_image", False)]),  # sized by Pillow, in a worker
        (image_bytes(np.zeros((side, side))), [("decode_image", False)]),
    ]
    for data, want in cases:
        seen.clear()
        r = client.post("/encode?model=ppca-digits", files=[("images", ("x", data, "application/octet-stream"))])
        assert r.status_code == 200 and seen == want, (r.text, seen)
    for pixels, on_loop in ((np.zeros((8, 8)), True), (np.zeros((side, side)), False)):
        seen.clear()
        r = client.post("/encode?model=ppca-digits", json={"images": [pixels.astype(int).tolist()]})
        assert r.status_code == 200 and seen == [("json_image", on_loop)], (r.text, seen)
    assert threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------------
# Property-based: mutated raw bodies never get a 5xx
# ------------------------------------------------------------------------------------------------

_SEEDS_JSON = [
    b'{"images": [[0, 0.5, 1, 0, 0, 0, 0, 0]]}',
    b'{"images": [' + json.dumps([[0.25] * 8] * 8).encode() + b"]}",
    b'{"z": [[0.0, 0.5, -1.0, 0.2, 0.0]]}',
]
_TOKENS = [b"[", b"]", b"{", b"}", b",", b":", b'"', b"\\", b"\\ud800", b"\\u0000", b"1e999", b"-", b"9" * 400,
           b"true", b"null", b"NaN", b"\xff", b"\xed\xa0\x80", b"\x00", b"[" * 2000, b"0" * 5000, b"\xef\xbb\xbf"]


@st.composite
def mutated(draw, seeds: list[bytes], tokens: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        token = draw(st.one_of(st.sampled_from(tokens), st.binary(min_size=1, max_size=8)))
        if op == "insert":
            data[pos:pos] = token
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "replace":
            data[pos:pos + len(token)] = token
        else:
            del data[pos:]
    return bytes(data)


_PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@_PROPERTY
@given(body=mutated(_SEEDS_JSON, _TOKENS), path=st.sampled_from(INFERENCE),
       ctype=st.sampled_from(["application/json", "application/problem+json", "text/plain"]))
def test_mutated_json_bodies_get_no_5xx(http, body, path, ctype):
    r = http.post(path, content=body, headers={"content-type": ctype})
    if r.status_code >= 400:
        problem(r, r.status_code)
    assert r.status_code < 500


def _multipart_seeds() -> list[bytes]:
    png = digit_png()
    one, _ = multipart_body([('name="images"; filename="a.png"', png)])
    two, _ = multipart_body([('name="images"; filename="a.png"', png),
                             ("name=images; filename*=UTF-8''%C3%A9.png", png)])
    return [one, two]


_MP_TOKENS = [b"--XbOuNdArY", b"--XbOuNdArY--", b"\r\n", b"\r\n\r\n", b"filename*=utf-7''+2AA-",
              b"filename*=idna''%00", b'filename="\\', b"; name*=x''y", b"Content-Disposition: form-data",
              b"\x89PNG\r\n\x1a\n", b"IHDR\xff\xff\xff\xff\xff\xff\xff\xff", b"\xed\xa0\x80", b'"', b";"]


@_PROPERTY
@given(body=mutated(_multipart_seeds(), _MP_TOKENS), path=st.sampled_from(["/encode", "/log-likelihood"]),
       ctype=st.sampled_from(["multipart/form-data; boundary=XbOuNdArY",
                              "multipart/form-data; boundary*=utf-8''XbOuNdArY",
                              "multipart/form-data; boundary*=utf-7''XbOuNdArY; boundary=XbOuNdArY",
                              'multipart/form-data; boundary="XbOuNdArY"; charset=idna']))
def test_mutated_multipart_bodies_get_no_5xx(http, body, path, ctype):
    r = http.post(path, content=body, headers={"content-type": ctype})
    if r.status_code >= 400:
        problem(r, r.status_code)
    assert r.status_code < 500


def test_no_traceback_in_the_server_log(live, http):
    """Runs last in this module: every hostile request above was answered without an unhandled error."""
    assert http.get("/health").status_code == 200
    assert "Traceback" not in live.log() and "unhandled error" not in live.log()


@pytest.mark.parametrize("detail, extra", [("name \ud800 and \udfff", {}), ("\ud83d\ude00 paired", {}),
                                           ("plain", {"value": float("nan")}), ("plain", {"odd": object()})])
def test_the_problem_writer_never_fails(detail, extra):
    """Whatever a detail quotes (lone surrogates from a client's odd encoding) or an extra member holds, the
    body is strict UTF-8 JSON with the RFC 9457 core members."""
    from service.errors import problem_bytes

    body = json.loads(problem_bytes(422, "Invalid", detail, "invalid", **extra).decode("utf-8"))
    assert body["status"] == 422 and body["type"] == "/problems/invalid"
    assert body["detail"] == detail.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
