"""The gateway's own log (warnings, errors, lifecycle): the ``gateway`` logger on stderr.

The per-request access log is separate (``access_log.py``) and goes to stdout.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys

import orjson

log = logging.getLogger("gateway")


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line = {
            "time": at.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:  # log.exception(): the traceback, in the same line
            line["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def setup_logging(level: str, fmt: str) -> None:
    """The ``gateway`` logger: JSON lines or plain text on stderr, at ``level``."""
    if fmt == "auto":
        fmt = "text" if os.isatty(2) else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
