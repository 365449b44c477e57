"""`python -m service [--host H] [--port P]`: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from service.app import create_app
from service.logs import configure_logging
from service.server import serve
from service.settings import Settings


def settings_from_args(argv: list[str]) -> Settings | None:
    """The settings `python -m service ARGV` runs with; None (and why, on stderr) when they are invalid."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--host", default=None, help="bind address (default: LATENTSERVE_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: LATENTSERVE_PORT or 8000)")
    parser.add_argument("--models-dir", default=None, help="model repository (default: LATENTSERVE_MODELS_DIR "
                        "or ./models)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "models_dir": args.models_dir}.items()
                 if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        # One line per bad setting, named as its environment variable; no traceback.
        lines = [f"  LATENTSERVE_{'_'.join(map(str, err['loc'])).upper()}: "
                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        print("latentserve: invalid settings, not starting:\n" + "\n".join(lines), file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(sys.argv[1:] if argv is None else argv)
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
