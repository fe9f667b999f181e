"""Logging for the daemons: one handler on stderr (journald picks it up), text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

# Libraries that would log every retry or refused request at WARNING and above.
NOISY = ("urllib3",)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(level: str, fmt: str = "text", *, quiet: Iterable[str] = ()) -> None:
    """Send every log record at ``level`` and above to stderr; ``quiet`` loggers are silenced."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.CRITICAL)
