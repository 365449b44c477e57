"""The service's log: one JSON object per line (the access log's lines are JSON already)."""

from __future__ import annotations

import json
import logging


class JSONLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{"):
            return msg  # already a JSON line (the access log)
        out = {"event": "log", "level": record.levelname.lower(), "logger": record.name, "message": msg}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str) -> None:
    logger = logging.getLogger("service")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_latentserve", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JSONLogFormatter())
        handler._latentserve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
