"""Structured JSON logs for every process, one object per line on stderr."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import orjson
import uvloop

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object; `extra={...}` fields become top-level keys."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self._component = component
        self._pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self._component,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": self._pid,
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(component: str, level: str | None = None) -> None:
    """Route all logging through the JSON formatter. Idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("APIGW_LOG_LEVEL", "INFO")).upper())
    for noisy in ("aiohttp.access", "urllib3", "streamlit"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


ERROR_TEXT_CHARS = 300


def error_text(exc: BaseException) -> str:
    """"Type: message" of an error, for a log line or a readiness answer. redis-py's repr
    names only a category and the type (`network:ConnectionError`), hiding the reason, e.g.
    "certificate verify failed"; its messages name the host and port, never the URL or its
    credentials."""
    message = str(exc).strip()
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text[:ERROR_TEXT_CHARS]


_TRANSPORT_FAILURES = ("Fatal error on SSL protocol", "Fatal error on transport")


def unretrieved_error_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's handler for errors nobody is there to handle. A network error of a
    connection no caller waits on any more - a connect or TLS handshake that fails after its
    caller timed out ("Future exception was never retrieved"), a transport torn down mid-
    handshake or close ("Fatal error on SSL protocol", which uvloop also raises as a
    RuntimeError on writing to a transport a refusing server just closed), e.g. against an
    untrusted certificate or a wrong password while a shutdown flush gave up - is one warning
    with the reason and no traceback: the caller already counted and logged its own failure.
    Everything else goes to asyncio's default handler (an error with the traceback)."""
    exc = context.get("exception")
    message = str(context.get("message", "")).split("\n", 1)[0][:200]
    if isinstance(exc, OSError) or message.startswith(_TRANSPORT_FAILURES):
        logging.getLogger("asyncio").warning("network error on a connection nobody awaits",
                                             extra={"context": message,
                                                    "error": error_text(exc) if exc else ""})
        return
    loop.default_exception_handler(context)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop with `unretrieved_error_handler`."""
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(unretrieved_error_handler)
    return loop
