"""The web page at / in a real browser: headless Chromium (Debian's `chromium`, through `executable_path`)
driven by Playwright (pytest-playwright's session browser, a fresh page per test) against `python -m service`.

Every figure the page shows is checked against the API asked directly (httpx) for the same pixels, and every
picture against the service's own PNG or the decoded images, pixel for pixel.
"""

from __future__ import annotations

import base64
import io
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("pytest_playwright", reason="pytest-playwright is not installed (the dev extra has it)")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from svc_helpers import image_bytes, start_server  # noqa: E402

from bench.web import chromium_path  # noqa: E402


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium to drive: install Debian's package (apt-get install chromium; scripts/test does "
                    "it in CI) or set LATENTSERVE_TEST_CHROMIUM to a Chromium binary")
    return {**browser_type_launch_args, "executable_path": path}


@pytest.fixture
def errors(page):
    """Console errors and uncaught exceptions of the page, for tests that expect none."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.append(f"pageerror: {e}"))
    return seen


def _open(page, url: str, model: str | None = None) -> None:
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    _wait_samples(page, 1)
    if model is not None:
        page.select_option("#model", model)
        _wait_samples(page, 2)


# Waits are functions, not expressions: Playwright evaluates an expression with eval(), which the page's
# Content-Security-Policy forbids.
def _wait_samples(page, count: int) -> None:
    page.wait_for_function("n => performance.getEntriesByName('latentserve:sample-grid').length >= n", arg=count)


def _evaluated(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.evaluated || 0)"))


def _wait_evaluated(page, before: int) -> None:
    page.wait_for_function("n => Number(document.body.dataset.evaluated || 0) > n "
                           "&& document.body.dataset.busy === '0'", arg=before)


def _pixels(page, selector: str) -> np.ndarray:
    """A canvas's pixels (RGB) as the page holds them."""
    url = page.eval_on_selector(selector, "c => c.toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def _gray(x) -> np.ndarray:
    """The service's 8-bit rendering of intensities (service/images.py png_grid), as RGB."""
    u8 = np.round(np.asarray(x, np.float32) * np.float32(255)).astype(np.uint8)
    return np.repeat(u8[:, :, None], 3, axis=2)


def _stroke(page, points) -> None:
    box = page.locator("#pad").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=3)
    page.mouse.up()


def test_a_stroke_shows_what_the_api_gives_for_the_same_pixels(page, live, need, errors):
    model = need("flow-vae-digits")
    _open(page, live.url, model)
    before = _evaluated(page)
    _stroke(page, [(0.5, 0.2), (0.55, 0.5), (0.5, 0.8)])
    _wait_evaluated(page, before)
    drawing = base64.b64decode(page.eval_on_selector("#pad", "c => c.toDataURL('image/png')").split(",", 1)[1])

    pre = httpx.post(f"{live.url}/preprocess", params={"model": model},
                     files={"images": ("drawing.png", drawing, "image/png")}).json()
    x = pre["results"][0]["x"]
    assert pre["binarized"] and 0 < np.sum(x) < 64
    np.testing.assert_array_equal(_pixels(page, "#seen"), _gray(x))

    enc = httpx.post(f"{live.url}/encode", params={"model": model}, json={"images": [x]}).json()["results"][0]
    rows = page.eval_on_selector_all("#code .bar-row", "rs => rs.map(r => [r.dataset.mean, r.dataset.std, "
                                     "r.dataset.zk])")
    shown = np.asarray(rows, dtype=np.float64)
    np.testing.assert_array_equal(shown[:, 0].astype(np.float32), np.float32(enc["mean"]))
    np.testing.assert_allclose(shown[:, 1], np.exp(np.asarray(enc["log_var"]) / 2), rtol=1e-12)
    np.testing.assert_array_equal(shown[:, 2].astype(np.float32), np.float32(enc["z_k"]))

    S = int(page.input_value("#samples"))
    ll = httpx.post(f"{live.url}/log-likelihood", params={"model": model, "samples": S, "seed": 0},
                    json={"images": [x]}).json()["results"][0]
    figures = {r[0]: (float(r[1]), float(r[2])) for r in page.eval_on_selector_all(
        "#bound-rows tr", "rs => rs.map(r => [r.dataset.figure, r.dataset.nats, r.dataset.bpd])")}
    assert figures["elbo"][0] == ll["elbo"] and figures["iw"][0] == ll["iw_bound"]
    assert figures["iw"][1] == pytest.approx(ll["bits_per_dim"], rel=1e-12)
    assert figures["elbo"][1] == pytest.approx(-ll["elbo"] / (64 * np.log(2)), rel=1e-9)

    recon = httpx.post(f"{live.url}/decode", params={"model": model, "format": "png"}, json={"z": [enc["z_k"]]})
    np.testing.assert_array_equal(_pixels(page, "#recon"), _png(recon.content))
    assert errors == []


def test_an_uploaded_or_dropped_png_is_evaluated_as_the_api_evaluates_the_file(page, live, digits, errors):
    _open(page, live.url, "ppca-digits")
    png = image_bytes(np.kron(digits.test[5].reshape(8, 8), np.ones((2, 2))))  # 16 x 16: resized to 8 x 8
    before = _evaluated(page)
    page.set_input_files("#file", files=[{"name": "digit.png", "mimeType": "image/png", "buffer": png}])
    _wait_evaluated(page, before)
    assert "resized from 16×16" in page.text_content("#seen-caption")
    pre = httpx.post(f"{live.url}/preprocess", params={"model": "ppca-digits"}, files={"images": ("d.png", png)})
    np.testing.assert_array_equal(_pixels(page, "#seen"), _gray(pre.json()["results"][0]["x"]))
    ll = httpx.post(f"{live.url}/log-likelihood", params={"model": "ppca-digits"}, files={"images": ("d.png", png)})
    exact = page.eval_on_selector("#bound-rows tr[data-figure=ll]", "r => [r.dataset.nats, r.dataset.bpd]")
    assert float(exact[0]) == ll.json()["results"][0]["log_likelihood"]
    assert float(exact[1]) == pytest.approx(ll.json()["results"][0]["bits_per_dim"], rel=1e-12)

    page.click("#clear")
    before = _evaluated(page)
    page.evaluate("""png => {
        const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.getElementById("pad-wrap").dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true,
                                                                                   cancelable: true }));
    }""", base64.b64encode(png).decode())
    _wait_evaluated(page, before)
    assert float(page.eval_on_selector("#bound-rows tr[data-figure=ll]", "r => r.dataset.nats")) == float(exact[0])
    assert errors == []


def test_the_sample_grid_has_the_pixels_of_get_sample(page, live, need, errors):
    model = need("vae-digits")
    _open(page, live.url, model)
    page.select_option("#sample-n", "16")
    page.fill("#sample-seed", "7")
    page.fill("#temperature", "0.8")
    page.click("#sample-form button[type=submit]")
    _wait_samples(page, 3)
    r = httpx.get(f"{live.url}/sample", params={"model": model, "n": 16, "seed": 7, "temperature": 0.8,
                                                 "format": "png", "scale": 1})
    grid = _png(r.content)
    assert grid.shape == (4 * 9 + 1, 4 * 9 + 1, 3)
    np.testing.assert_array_equal(_pixels(page, "#sample-grid"), grid)
    assert errors == []


def test_interpolation_and_traversal_strips(page, live, need, errors):
    model = need("vae-digits")
    _open(page, live.url, model)
    grid = _pixels(page, "#sample-grid")  # 64 samples, 8 a row, 9 pixels apart

    def tile(k: int) -> np.ndarray:  # sample k (1-based) of the grid
        r, c = divmod(k - 1, 8)
        return grid[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c]

    page.fill("#sample-pick", "3")
    page.click("#a-sample")
    page.fill("#sample-pick", "5")
    page.click("#b-sample")
    page.fill("#interp-steps", "7")
    page.check("#path-slerp")
    page.click("#interp-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('interp-strip').width === 7 * 9 + 1")
    strip = _pixels(page, "#interp-strip")
    assert strip.shape == (10, 64, 3) and page.get_attribute("#interp-strip", "data-images") == "7"
    np.testing.assert_array_equal(strip[1:9, 1:9], tile(3))  # the ends are the samples themselves
    np.testing.assert_array_equal(strip[1:9, 6 * 9 + 1:6 * 9 + 9], tile(5))

    page.select_option("#traverse-base", "zero")
    page.select_option("#traverse-dim", "2")  # z3
    page.fill("#traverse-steps", "5")
    page.fill("#traverse-range", "2")
    page.click("#traverse-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('traverse-strip').width === 5 * 9 + 1")
    d = httpx.get(f"{live.url}/models/{model}").json()["latent_dim"]
    z = np.zeros((5, d))
    z[:, 2] = np.linspace(-2, 2, 5)
    images = httpx.post(f"{live.url}/decode", params={"model": model}, json={"z": z.tolist()}).json()["images"]
    strip = _pixels(page, "#traverse-strip")
    for i, image in enumerate(images):
        np.testing.assert_array_equal(strip[1:9, 1 + 9 * i:9 + 9 * i], _gray(image))
    assert errors == []


def test_a_bad_file_shows_the_services_error(page, live):
    _open(page, live.url)
    junk = b"this is not an image"
    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": junk}])
    page.wait_for_selector("#error:not([hidden])")
    detail = httpx.post(f"{live.url}/preprocess", files={"images": ("notes.png", junk)}).json()["detail"]
    assert detail in page.text_content("#error") and "415" in page.text_content("#error")


def test_keyboard_alone_on_a_phone_sized_screen(browser, live, errors):
    """Every control is reachable: a drawing made with the keys is evaluated; nothing overflows 375 px."""
    context = browser.new_context(viewport={"width": 375, "height": 740}, has_touch=True, is_mobile=True)
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        _open(page, live.url)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, button')].filter(e =>
            !(e.labels && e.labels.length) && e.tagName !== 'BUTTON').map(e => e.id)""")
        assert unlabeled == []
        page.focus("#pad")
        before = _evaluated(page)
        page.keyboard.press("Space")
        for _ in range(6):
            page.keyboard.press("Shift+ArrowDown")
        page.keyboard.press("Space")
        _wait_evaluated(page, before)
        assert page.locator("#bound-rows tr").count() == 1  # ppca-digits, the default: exact log-likelihood
        page.keyboard.press("Control+z")
        page.wait_for_function("() => document.getElementById('bound-rows').children.length === 0")
        # Tab reaches every visible control (of a radio group, the checked one: arrows move within it)
        controls = set(page.evaluate("""[...document.querySelectorAll('input, select, button, #pad')].filter(e =>
            e.checkVisibility() && !e.disabled && !(e.type === 'radio' && !e.checked)).map(e => e.id)"""))
        page.focus("#model")
        reached = set()
        for _ in range(len(controls) + 10):
            reached.add(page.evaluate("document.activeElement.id"))
            page.keyboard.press("Tab")
        assert controls - reached == set(), controls - reached
    finally:
        context.close()
    assert errors == []


def test_api_docs_render_with_other_hosts_blocked(page, live, errors):
    blocked = []

    def only_loopback(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.context.route("**/*", only_loopback)
    spec = httpx.get(f"{live.url}/openapi.json").json()
    operations = sum(len(item) for item in spec["paths"].values())
    page.goto(f"{live.url}/docs")
    page.wait_for_function("n => document.querySelectorAll('.opblock').length === n", arg=operations)
    page.goto(f"{live.url}/redoc")
    page.wait_for_function("n => document.querySelectorAll('[data-section-id^=\"operation/\"]').length === n",
                           arg=operations)
    assert blocked == [] and errors == []


@pytest.fixture(scope="module")
def keyed(model_repo, tmp_path_factory):
    server = start_server(model_repo, tmp_path_factory.mktemp("web-keyed") / "server.log", api_key="s3cret",
                          default_model="ppca-digits")
    yield server
    server.stop()


def test_the_api_key_field(page, keyed):
    page.goto(keyed.url + "/")
    page.wait_for_selector("#error:not([hidden])")
    assert "X-API-Key" in page.text_content("#error") and page.get_attribute("#key-box", "open") is not None
    page.fill("#api-key", "s3cret")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("body[data-ready=true]")
    assert page.evaluate("sessionStorage.getItem('latentserve.apiKey')") == "s3cret"
    page.reload()  # kept for the tab
    page.wait_for_selector("body[data-ready=true]")
    page.goto(keyed.url + "/docs")  # the docs send it too
    page.wait_for_selector(".opblock")
