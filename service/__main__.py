"""`python -m service [--host H] [--port P]`: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from service.app import configure_logging, create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--host", default=None, help="bind address (default: LATENTSERVE_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: LATENTSERVE_PORT or 8000)")
    parser.add_argument("--models-dir", default=None, help="model repository (default: LATENTSERVE_MODELS_DIR "
                        "or ./models)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "models_dir": args.models_dir}.items()
                 if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log, timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
                proxy_headers=False, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
