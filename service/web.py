"""The web page at / and the interactive API docs at /docs and /redoc, all served by the service itself.

The page (service/web/index.html; its JavaScript modules and stylesheet in service/web/ui/, no build step)
calls only the public API, same-origin. Every asset comes from the service: the page's under /ui/, Swagger
UI's and ReDoc's under /ui/vendor/ from the `fastapi-offline` package (FastAPI's own /docs loads them from a
public CDN: a blank page on an air-gapped host). No page runs an inline script, and each is served under a
Content-Security-Policy that allows scripts from the service alone (service/web/ui/docs.js and redoc.js
start Swagger UI and ReDoc, which FastAPI's pages do inline).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles

from service import preprocess

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


def _file(path: Path, csp: str):
    """A handler that answers `path`'s bytes, read now, from memory. The page's files are a few tens of kB;
    answered this way each costs no thread hop (FileResponse makes several per file, which wait when the CPUs
    are busy). The ETag lets the browser revalidate them (Cache-Control: no-cache)."""
    body = path.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    media_type = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}[path.suffix]
    headers = {**HEADERS, "Content-Security-Policy": csp, "ETag": etag}

    async def handler(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return handler


class _VendorFiles(StaticFiles):
    """Swagger UI's and ReDoc's files (megabytes, read by the docs pages only), with the security headers."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update({**HEADERS, "Content-Security-Policy": PAGE_CSP})
        return response


def install(app: FastAPI, resolve_model) -> None:
    """Add the pages, their files, the docs' files and POST /preprocess (the pixels the model sees) to `app`.

    `app` must be built with docs_url=None and redoc_url=None: these /docs and /redoc replace FastAPI's.
    """
    preprocess.add_route(app, resolve_model)
    for path, name, csp in (("/", "index.html", PAGE_CSP), ("/docs", "docs.html", PAGE_CSP),
                            ("/redoc", "redoc.html", REDOC_CSP)):
        app.add_route(path, _file(WEB_DIR / name, csp), methods=["GET", "HEAD"], include_in_schema=False)
    for asset in sorted((WEB_DIR / "ui").iterdir()):
        app.add_route(f"/ui/{asset.name}", _file(asset, PAGE_CSP), methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/ui/vendor", _VendorFiles(directory=VENDOR_DIR), name="ui-vendor")
