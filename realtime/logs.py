"""Logging of the server: the one place that configures it.

``configure(level, fmt)`` gives the root logger one stderr handler, so every logger of
the server (``realtime.*``, ``notifications.*``, ``uvicorn.*``) writes through it at
``level``; uvicorn's own handlers are removed so it cannot configure over it. Lines are
``text`` (``<ts> <LEVEL> <logger>: <message>``) or ``json`` (one object per line: ``ts``,
``level``, ``logger``, ``message`` and ``exc_info`` when there is one); ``ts`` is ISO 8601
UTC with milliseconds. Per-connection lines (``realtime.ws``) stay at WARNING unless the
level is ``debug``. A filter on the handler redacts the password of any Redis URL
(``redis://user:pass@host`` -> ``redis://user:***@host``) in every line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO, Literal

LogFormat = Literal["text", "json"]

#: The loggers uvicorn configures for itself; they propagate to the root handler instead.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
#: One line per WebSocket connection event: shown at ``debug`` only.
PER_CONNECTION_LOGGER = "realtime.ws"

#: ``scheme://user:PASSWORD@``: the password runs to the last ``@`` before a space or ``/``.
_REDIS_PASSWORD = re.compile(r"(?P<head>\b(?:rediss?|unix)://[^:/@\s]*:)[^\s/]*(?P<at>@)")


def redact(text: str) -> str:
    """``text`` with the password of every Redis URL in it replaced by ``***``."""
    return _REDIS_PASSWORD.sub(r"\g<head>***\g<at>", text)


def iso_utc(created: float) -> str:
    """``created`` (seconds since the epoch) as ISO 8601 UTC with milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO realtime: message`` (traceback on the next lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and exc_info when present."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


class RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose every formatted line goes through ``redact``: message,
    arguments and traceback alike, whichever logger wrote it."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(level: str = "info", fmt: LogFormat = "text", stream: IO[str] | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr) at ``level`` (debug, info,
    warning or error) in ``fmt``.

    Idempotent: a second call replaces the handler of the first (uvicorn calls it again in
    each worker process)."""
    handler = RedactingHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RedactingHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    logging.getLogger(PER_CONNECTION_LOGGER).setLevel(
        logging.NOTSET if level == "debug" else logging.WARNING
    )
