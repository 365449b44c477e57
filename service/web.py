"""The web page at / and the interactive API docs at /docs and /redoc, all served by the service itself.

The page (service/web/index.html; its JavaScript modules and stylesheet in service/web/ui/, no build step)
calls only the public API, same-origin. Every asset comes from the service: the page's under /ui/, Swagger
UI's and ReDoc's under /ui/vendor/ from the `fastapi-offline` package (FastAPI's own /docs loads them from a
public CDN: a blank page on an air-gapped host). No page runs an inline script, and each is served under a
Content-Security-Policy that allows scripts from the service alone (service/web/ui/docs.js and redoc.js
start Swagger UI and ReDoc, which FastAPI's pages do inline).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).with_name("web")  # the pages; their scripts and stylesheet in web/ui/
VENDOR_DIR = Path(fastapi_offline.__file__).with_name("static")

# Paths the API key does not guard (service/middleware.py): static files that hold no data. The page asks
# for the key itself and sends it with its API calls; /docs and /redoc send the key the page stored.
OPEN_PATHS = frozenset({"/", "/docs", "/redoc"})
OPEN_PREFIX = "/ui/"

_COMMON = ("default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
           "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The page and Swagger UI: styles from stylesheets only (scripts that set element.style go through the
# CSSOM, which a policy does not govern).
PAGE_CSP = _COMMON + "; style-src 'self'"
# ReDoc writes <style> elements at run time (styled-components) and runs its search in a worker made from a
# blob: URL. Its script still comes from the service alone.
REDOC_CSP = _COMMON + "; style-src 'self' 'unsafe-inline'; worker-src 'self' blob:"
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           # revalidated on every load (ETag): a new release of the service never runs an old module
           "Cache-Control": "no-cache"}


class _Assets(StaticFiles):
    """StaticFiles with the page's security headers on every answer."""

    def __init__(self, directory: Path, csp: str):
        super().__init__(directory=directory)
        self.headers = {**HEADERS, "Content-Security-Policy": csp}

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(self.headers)
        return response


def _page(name: str, csp: str):
    path = WEB_DIR / name
    headers = {**HEADERS, "Content-Security-Policy": csp}

    async def page() -> FileResponse:
        return FileResponse(path, media_type="text/html; charset=utf-8", headers=headers)

    page.__name__ = f"page_{path.stem}"
    return page


def install(app: FastAPI) -> None:
    """Add the page, its assets and the docs to `app` (POST /preprocess, which the page calls, is one of the
    service's routes: service/preprocess.py).

    `app` must be built with docs_url=None and redoc_url=None: these /docs and /redoc replace FastAPI's.
    """
    app.add_api_route("/", _page("index.html", PAGE_CSP), include_in_schema=False, methods=["GET", "HEAD"])
    app.add_api_route("/docs", _page("docs.html", PAGE_CSP), include_in_schema=False, methods=["GET", "HEAD"])
    app.add_api_route("/redoc", _page("redoc.html", REDOC_CSP), include_in_schema=False, methods=["GET", "HEAD"])
    # /ui/vendor before /ui: the first mount that matches a path serves it
    app.mount("/ui/vendor", _Assets(VENDOR_DIR, PAGE_CSP), name="ui-vendor")
    app.mount("/ui", _Assets(WEB_DIR / "ui", PAGE_CSP), name="ui")
