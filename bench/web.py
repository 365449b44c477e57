"""The web page at / in a real browser: load time, stroke-to-result latency and a 64-sample grid, as the page
itself measures them with performance.now() (User Timing measures, service/web/ui/main.js), and screenshots.

    .venv/bin/python -m bench.web --models-dir models                     # figures -> docs/benchmarks.md
    .venv/bin/python -m bench.web --models-dir models --screenshots docs  # also docs/web_*.png

Starts `python -m service` from this checkout on 127.0.0.1 and drives headless Chromium (Debian's
`chromium`, through Playwright) against it, in `--rounds` rounds; each round:
1. opens the page `--loads` times, each in a fresh browser context (empty cache), and reloads it each time
   (its files revalidated): navigation start -> the models listed and the drawing pad ready
   ("latentserve:interactive");
2. for each model, draws `--strokes` strokes of about 300 ms each (30 pointer moves, the page's live
   updates running meanwhile, as for a person drawing): end of the stroke (pointerup) -> the reconstruction,
   code and bound on screen, in the frame that shows them ("latentserve:stroke-result");
3. for each model, draws `--grids` grids of 64 samples with new seeds: the click -> the grid on screen
   ("latentserve:sample-grid").
Prints medians and 90th percentiles against the goals (300, 100 and 200 ms) and records them in
docs/benchmarks.md ("Web page in the browser"; `--no-save`: not).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

from bench.report import publish, table
from bench.servers import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
GOALS_MS = {"interactive": 300.0, "stroke-result": 100.0, "sample-grid": 200.0}


def chromium_path() -> str | None:
    """A Chromium binary to drive: $LATENTSERVE_TEST_CHROMIUM, else Debian's (its /usr/bin/chromium is a wrapper
    script around /usr/lib/chromium/chromium)."""
    for path in (os.environ.get("LATENTSERVE_TEST_CHROMIUM"), "/usr/lib/chromium/chromium",
                 shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).is_file():
            return path
    return None


def start_server(models_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSERVE_")}
    env.update({"LATENTSERVE_MODELS_DIR": str(models_dir.resolve()), "LATENTSERVE_PORT": str(port),
                "LATENTSERVE_LOG_LEVEL": "warning"})
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + "/ready")
    return proc, url


def measures(page, name: str) -> list[float]:
    return page.evaluate("n => performance.getEntriesByName('latentserve:' + n).map(m => m.duration)", name)


def wait_count(page, name: str, count: int) -> None:
    page.wait_for_function("([n, c]) => performance.getEntriesByName('latentserve:' + n).length >= c",
                           arg=[name, count], timeout=30000)


def stroke(page, points, pause_ms: float = 10) -> None:
    """One stroke through `points` (fractions of the pad), one pointer move each `pause_ms`."""
    box = page.locator("#pad").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p)
        page.wait_for_timeout(pause_ms)
    page.mouse.up()


def digit_three(n: int = 30) -> list[tuple[float, float]]:
    """A '3' in one stroke (pad fractions, inside the central MNIST box): two arcs open to the left, the first
    from its upper left over the top to its bottom, where the second starts and runs to its lower left; angle
    t from the top, clockwise."""
    r = 0.13
    top = [(0.5 + r * math.sin(t), 0.36 - r * math.cos(t)) for t in _spaced(-0.35 * math.pi, math.pi, n)]
    bottom = [(0.5 + r * math.sin(t), 0.62 - r * math.cos(t)) for t in _spaced(0.0, 1.35 * math.pi, n)]
    return top + bottom[1:]


def _spaced(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def vertical(i: int, n: int = 30) -> list[tuple[float, float]]:
    x = 0.4 + 0.02 * (i % 10)
    return [(x + 0.1 * k / (n - 1), 0.22 + 0.56 * k / (n - 1)) for k in range(n)]


def loads(browser, url: str, n: int) -> tuple[list[float], list[float]]:
    """`n` first loads, each in a fresh browser context (empty cache), and `n` reloads of the page (its files
    revalidated): navigation start -> interactive."""
    first, again = [], []
    for _ in range(n):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(url + "/")
        wait_count(page, "interactive", 1)
        first += measures(page, "interactive")
        wait_count(page, "sample-grid", 1)  # the page's work after it became interactive, before the reload
        page.reload()
        wait_count(page, "interactive", 1)
        again += measures(page, "interactive")
        context.close()
    return first, again


def one_round(browser, url: str, models: list[str], args) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    first, again = loads(browser, url, args.loads)
    out["page"] = {"interactive": first, "reload": again}
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url + "/")
    wait_count(page, "sample-grid", 1)
    grids = 1
    for model in models:
        page.select_option("#model", model)
        grids += 1
        wait_count(page, "sample-grid", grids)
        page.click("#clear")
        done = len(measures(page, "stroke-result"))
        for i in range(args.strokes):
            stroke(page, vertical(i))
            done += 1
            wait_count(page, "stroke-result", done)
        first = len(measures(page, "sample-grid"))
        for i in range(args.grids):
            page.fill("#sample-seed", str(1000 + i))
            page.click("#sample-form button[type=submit]")
            grids += 1
            wait_count(page, "sample-grid", grids)
        out[model] = {"stroke-result": measures(page, "stroke-result")[-args.strokes:],
                      "sample-grid": measures(page, "sample-grid")[first:]}
    context.close()
    return out


def screenshots(browser, url: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.goto(url + "/")
    wait_count(page, "sample-grid", 1)
    stroke(page, digit_three(), pause_ms=5)
    page.wait_for_function("() => document.body.dataset.busy === '0' && document.body.dataset.evaluated")
    page.click("#b-input")
    page.wait_for_timeout(500)
    page.screenshot(path=str(folder / "web_page.png"), full_page=True)
    page.goto(url + "/docs")
    page.wait_for_selector(".opblock")
    page.screenshot(path=str(folder / "web_docs.png"))
    context.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True,
                                has_touch=True)
    page = phone.new_page()
    page.goto(url + "/")
    wait_count(page, "sample-grid", 1)
    stroke(page, digit_three(), pause_ms=5)
    page.wait_for_function("() => document.body.dataset.busy === '0' && document.body.dataset.evaluated")
    page.screenshot(path=str(folder / "web_phone.png"))
    phone.close()


def summary(rounds: list[dict], models: list[str]) -> str:
    rows = []

    def row(what: str, key: str, values: list[float]) -> None:
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        goal = GOALS_MS[key]
        rows.append([what, len(values), f"{statistics.median(values):.0f}", f"{p90:.0f}", f"{max(values):.0f}",
                     f"<= {goal:.0f}", "met" if statistics.median(values) <= goal else "missed"])

    row("page load to interactive, first load (fresh context)", "interactive",
        [v for r in rounds for v in r["page"]["interactive"]])
    row("page load to interactive, reload", "interactive", [v for r in rounds for v in r["page"]["reload"]])
    for model in models:
        row(f"end of stroke to reconstruction + bound, {model}", "stroke-result",
            [v for r in rounds for v in r[model]["stroke-result"]])
    for model in models:
        row(f"sample grid of 64, {model}", "sample-grid", [v for r in rounds for v in r[model]["sample-grid"]])
    return table(["what", "n", "median ms", "p90 ms", "max ms", "goal (median)", ""], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loads", type=int, default=5, help="page loads (and reloads) per round")
    ap.add_argument("--strokes", type=int, default=10)
    ap.add_argument("--grids", type=int, default=5)
    ap.add_argument("--screenshots", type=Path, default=None, help="save docs/web_*.png-style screenshots here")
    ap.add_argument("--no-save", action="store_true", help="print only; do not record in docs/benchmarks.md")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        print("no chromium found: apt-get install chromium, or set LATENTSERVE_TEST_CHROMIUM", file=sys.stderr)
        return 2
    proc, url = start_server(args.models_dir)
    load_before = os.getloadavg()[0]
    try:
        models = sorted(m["name"] for m in httpx.get(url + "/models").json()["models"])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable)
            try:
                if args.screenshots is not None:
                    screenshots(browser, url, args.screenshots)
                rounds = [one_round(browser, url, models, args) for _ in range(args.rounds)]
                version = browser.version
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    body = summary(rounds, models) + (
        f"\n\nHeadless Chromium {version} (Debian's) driven by Playwright, against `python -m service` on 127.0.0.1 "
        f"serving {', '.join(models)} from `{args.models_dir}`; {args.rounds} rounds, each of {args.loads} page "
        f"loads in fresh browser contexts, each followed by a reload, then in one more context, per model, "
        f"{args.strokes} strokes of 30 pointer moves 10 ms apart (the page's live "
        f"updates run meanwhile) and {args.grids} grids of 64 samples. Times are the page's own "
        "`performance.measure` entries: navigation start to the models listed and the pad ready; pointerup to "
        "the animation frame after the reconstruction, the code and the bound (ELBO and IW bound with S = 100, "
        "or PPCA's exact log-likelihood) are in the page, which is 3 API calls (POST /preprocess, then POST "
        "/encode -> POST /decode alongside POST /log-likelihood); the click to the frame after the grid is "
        "drawn (GET /sample?n=64&format=json, drawn pixel for pixel). The machine's 1-minute load average: "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work shares its cores).")
    publish("Web page in the browser", body, module="bench.web", save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
