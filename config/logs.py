"""Log formatting: ISO-8601 UTC timestamps, and the request id on every line logged in a request.

Used by `LOGGING` in `config/settings.py`. The request id is set by
`edge.layer.EdgeLayer` in a context variable, so it reaches every log
line of the request (views, services, sync code run through `sync_to_async`) without threading
it through calls.
"""

from __future__ import annotations

import functools
import logging
import time
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

request_id: ContextVar[str | None] = ContextVar("kurs_request_id", default=None)


def iso_utc(created: float) -> str:
    """`2026-11-30T18:24:36.657Z`: what log shippers parse without guessing a zone."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def iso_second(seconds: int) -> str:
    """`2026-11-30T18:24:36`: the second of `iso_utc`."""
    # Lines come many to a second (the access log): the second's text is made once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class ConsoleFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} [request_id={rid}]" if rid else text


class JsonFormatter(_JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        # uvicorn adds the message again with ANSI colour codes: noise in a JSON line.
        log_data.pop("color_message", None)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to records logged while a request is served (a handler filter, so it
    sees the records that propagate from every logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        if current is not None and not hasattr(record, "request_id"):
            record.request_id = current
        return True


class DropServerAccessLines(logging.Filter):
    """Drops daphne `runserver`'s per-request HTTP lines (the access log is our middleware's,
    one line per request with its id) and keeps its WebSocket connect/disconnect lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "HTTP %(method)s" not in str(record.msg)
