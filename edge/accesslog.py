"""Request ids and the access log: one line per request, written in batches.

- Every request gets an id: a sane incoming `X-Request-ID` (from nginx or a client) is kept,
  otherwise one is generated; the edge returns it as `X-Request-ID` and puts it on every log line
  of the request (`config.logs.request_id`, a context variable).
- One access line per request (`kurs.access`), whichever entrance answered: the servers' own
  access logs are off in `LOGGING`, so nothing is logged twice.
- The lines are written as nginx's `access_log ... buffer= flush=` writes them: `log_access`
  appends a tuple of the request's fields to one list (`_AccessChannel`), and the lines are
  made and written together, when CAPACITY lines are waiting or every FLUSH_S (a thread per
  process), and at exit, by each of `kurs.access`'s handlers (`BufferedStreamHandler`, the
  `access` handler in `LOGGING`) with its formatter and level. A request pays for a level
  check, a tuple and a list append: no LogRecord, no handler call. Any other handler, or a
  filter on the logger, gets the lines as logged records (`Logger.handle`).
- With the console format a batch's lines are made by one `%` format each, in C, the second's
  text once per second (`console_lines`), but only when the configured formatter gives the same
  text for a probe line (`BufferedStreamHandler.setFormatter` checks); any other formatter
  (JSON, a changed format) formats AccessRecords as usual (docs/decisions.md).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import threading
import time
import uuid
from typing import IO, Any, cast

from config.logs import iso_second

access_logger = logging.getLogger("kurs.access")

HEADER = "X-Request-ID"
# Anything else (too long, spaces, control characters) could forge log lines or bloat them.
_SANE_ID = re.compile(r"[A-Za-z0-9._:+/=-]{8,128}")


class _RequestIds:
    """New request ids: 32 hex digits, a random per-process prefix and a counter.

    Unique like uuid4's without its `os.urandom` system call per request (12 % of a /courses
    answer's time from memory under load, profiled with py-spy). A forked child draws a new prefix.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds()


def request_id_for(incoming: str) -> str:
    """A sane incoming `X-Request-ID`, else a new one."""
    return incoming if incoming and _SANE_ID.fullmatch(incoming) else new_request_id()


class AccessRecord(logging.LogRecord):
    """A LogRecord made cheaply: an access line has no caller, exception or stack to look up,
    and its formats read only its time, level, name, message and the request's fields."""

    def __init__(self, level: int, msg: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
        self.__dict__.update(_CONSTANT)  # formats read the instance's own attributes
        self.__dict__.update(fields)
        self.msg = msg
        self.args = args
        self.levelno = level
        self.levelname = _LEVEL_NAMES[level]
        created = self.created = time.time()
        self.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord
        self.process = _PROCESS.pid


_LEVEL_NAMES = {logging.INFO: "INFO", logging.WARNING: "WARNING"}
# What LogRecord would look up for each record, the same for every access line.
_CONSTANT: dict[str, Any] = {
    "name": access_logger.name,
    "pathname": __name__,
    "filename": __name__,
    "module": __name__,
    "lineno": 0,
    "funcName": None,
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "thread": None,
    "threadName": None,
    "processName": None,
    "relativeCreated": 0.0,  # no format of Kurs's reads it
}


class _Process:
    """This process's id, kept: `os.getpid()` is a system call."""

    def __init__(self) -> None:
        self._read()
        os.register_at_fork(after_in_child=self._read)

    def _read(self) -> None:
        self.pid = os.getpid()


_PROCESS = _Process()


# One request's line, as log_access hands it to a BufferedStreamHandler: (created, level, method,
# full path, path, status, duration in ms, client, request id).
Entry = tuple[float, int, str, str, str, int, float, str | None, str]
_MESSAGE = "%s %s %d %.1fms"


def access_record(entry: Entry) -> AccessRecord:
    created, level, method, full_path, path, status, duration_ms, client, request_id = entry
    fields = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration_ms, 2),
        "client": client,
        "request_id": request_id,
    }
    record = AccessRecord(level, _MESSAGE, (method, full_path, status, duration_ms), fields)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def _as_record(item: logging.LogRecord | Entry) -> logging.LogRecord:
    return item if isinstance(item, logging.LogRecord) else access_record(item)


def console_line(entry: Entry) -> str:
    """The line `config.logs.ConsoleFormatter` makes of an access record with Kurs's console
    format (`LOGGING["formatters"]["console"]`), made directly."""
    return console_lines([entry])[:-1]


# `iso_utc`, the level name padded to 7 (`%(levelname)-7s`), the logger and the message, in one
# format: a batch's lines are made by one `%` each, in C, the second's text once per second.
_CONSOLE = "%s.%03dZ %-7s kurs.access: %s %s %d %.1fms [request_id=%s]\n"


def console_lines(entries: list[Entry]) -> str:
    """`console_line` of each entry, each ending in a newline: a batch's text."""
    lines = []
    second = -1
    stamp = ""
    for created, level, method, full_path, _, status, duration_ms, _, request_id in entries:
        whole = int(created)
        if whole != second:
            second, stamp = whole, iso_second(whole)
        # %03d truncates the milliseconds as iso_utc's int() does.
        millis = (created - whole) * 1000
        name = _LEVEL_NAMES[level]
        lines.append(
            _CONSOLE % (stamp, millis, name, method, full_path, status, duration_ms, request_id)
        )
    return "".join(lines)


def log_access(
    method: str,
    full_path: str,
    path: str,
    status: int,
    duration_ms: float,
    client: str | None,
    request_id: str,
) -> None:
    """The one access line of a request, when its level is on.

    The hot path is a level check, a tuple and an append to the channel's list
    (`_AccessChannel`); the lines are made and written later, in batches.
    """
    level = logging.WARNING if status >= 500 else logging.INFO
    if not access_logger.isEnabledFor(level):
        return
    entry: Entry = (
        time.time(),
        level,
        method,
        full_path,
        path,
        status,
        duration_ms,
        client,
        request_id,
    )
    channel = _channel
    if access_logger.handlers != channel.handlers or access_logger.filters:
        channel.route(entry)  # the handlers changed, or not all are buffered, or a filter
        return
    entries = channel.entries
    entries.append(entry)
    if len(entries) >= channel.capacity:
        channel.flush()
    elif channel.pid != _PROCESS.pid:
        channel.start()


class _AccessChannel:
    """The access lines waiting for `kurs.access`'s handlers, when every one of them is a
    BufferedStreamHandler (as `LOGGING` configures it).

    One list for all of them, appended to by `log_access`; written out (`flush`) when the
    smallest of the handlers' capacities is reached, every smallest `flush_s` by a thread of
    this process, and at exit: each handler formats the batch as its formatter and level say.
    Worked out again when the logger's handlers change (a list compared with its copy per
    request); while they are anything else, or the logger has a filter, a line is logged as
    any record (`Logger.handle`).
    """

    def __init__(self) -> None:
        # Never equal to a logger's handler list until `route` has looked at one.
        self.handlers: list[logging.Handler] | None = None
        self.buffered: tuple[BufferedStreamHandler, ...] = ()
        self.entries: list[Entry] = []
        self.capacity = CAPACITY
        self.flush_s = FLUSH_S
        self.pid = 0  # the process whose flusher runs
        self.lock = threading.Lock()
        self._wake = threading.Event()
        atexit.register(self.flush)

    def route(self, entry: Entry) -> None:
        handlers = access_logger.handlers
        if all(type(h) is BufferedStreamHandler for h in handlers) and handlers:
            buffered = tuple(cast(BufferedStreamHandler, h) for h in handlers)
            if buffered != self.buffered:
                self.flush()  # what is waiting goes to the handlers it was logged for
                self.buffered = buffered
                self.capacity = min(h.capacity for h in buffered)
                self.flush_s = min(h.flush_s for h in buffered)
                self._wake.set()  # the flusher waits the new flush_s from now
            self.handlers = list(handlers)
        else:
            self.flush()
            self.handlers, self.buffered = None, ()
        if self.handlers is None or access_logger.filters:
            access_logger.handle(access_record(entry))  # as logged: filters, other handlers
            return
        self.entries.append(entry)
        if len(self.entries) >= self.capacity:
            self.flush()
        elif self.pid != _PROCESS.pid:
            self.start()

    def flush(self) -> None:
        with self.lock:
            entries, self.entries = self.entries, []
            if entries:
                for handler in self.buffered:
                    handler.write_entries(entries)

    def start(self) -> None:
        # One per process (a forked worker starts its own).
        self.pid = _PROCESS.pid
        threading.Thread(target=self._run, name="access-log", daemon=True).start()

    def _run(self) -> None:
        while True:
            if self._wake.wait(self.flush_s):
                self._wake.clear()  # woken by a new flush_s: wait that long first
            else:
                self.flush()


CAPACITY = 256
FLUSH_S = 0.5


# typeshed makes StreamHandler generic in its stream; subscripting it fails at run time.
class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes its lines in batches (see the module's docstring).

    `log_access`'s lines come in batches from `_AccessChannel` (`write_entries`); records
    logged the usual way (`handle`, `emit`) and entries handed to `add` wait in its own list.
    """

    def __init__(
        self, stream: IO[str] | None = None, capacity: int = CAPACITY, flush_s: float = FLUSH_S
    ) -> None:
        super().__init__(stream)
        self.capacity = capacity
        self.flush_s = flush_s
        self._records: list[logging.LogRecord | Entry] = []
        self._console = False
        self._flusher: threading.Thread | None = None
        self._pid = 0
        atexit.register(self.flush)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        probe: Entry = (1.5, logging.INFO, "GET", "/p?q=1", "/p", 200, 1.25, None, "r" * 8)
        self._console = fmt is not None and fmt.format(access_record(probe)) == console_line(probe)

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record)

    def add(self, item: logging.LogRecord | Entry) -> None:
        """Keep a record, or a request's fields, for the next write."""
        self._records.append(item)
        if len(self._records) >= self.capacity:
            self.flush()
        elif self._pid != _PROCESS.pid:
            self._start_flusher()

    def flush(self) -> None:
        # typeshed types the lock Optional; Handler.__init__ always makes it.
        with self.lock:  # type: ignore[union-attr]
            records, self._records = self._records, []
            lines = []
            for item in records:
                record = self._record_of(item)
                if record is None:
                    continue
                try:
                    line = record if isinstance(record, str) else self.format(record)
                    lines.append(line + self.terminator)
                except Exception:  # as StreamHandler: a bad record must not stop the others
                    self.handleError(_as_record(item))
            self._write("".join(lines), records)

    def write_entries(self, entries: list[Entry]) -> None:
        """Write a batch of `log_access`'s entries (those at or above the handler's level)."""
        if self._console and not self.filters and self.terminator == "\n":
            if self.level > logging.INFO:
                entries = [entry for entry in entries if entry[1] >= self.level]
            try:
                text = console_lines(entries)
            except Exception:  # as StreamHandler: a bad line must not stop the others
                self.handleError(access_record(entries[-1]))
                return
            with self.lock:  # type: ignore[union-attr]
                self._write(text, entries)
            return
        with self.lock:  # type: ignore[union-attr]
            self._records.extend(entries)
            self.flush()

    def _write(self, text: str, items: list[logging.LogRecord | Entry] | list[Entry]) -> None:
        if text:
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(_as_record(items[-1]))

    def _record_of(self, item: logging.LogRecord | Entry) -> logging.LogRecord | str | None:
        """What to format (or the line itself), or None when the handler drops it."""
        if isinstance(item, logging.LogRecord):
            return item  # handle() has filtered it already
        if item[1] < self.level:
            return None  # as Logger.callHandlers: below the handler's level
        if self._console and not self.filters:
            return console_line(item)
        record = access_record(item)
        return record if self.filter(record) else None

    def _start_flusher(self) -> None:
        # One per process (a forked worker starts its own): waits FLUSH_S between flushes.
        self._pid = _PROCESS.pid
        self._flusher = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._flusher.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_s)
            self.flush()

    def close(self) -> None:
        self.flush()
        super().close()


_channel = _AccessChannel()


def flush_access_log(**_: Any) -> None:
    """Write every waiting access line now (tests read them at once)."""
    _channel.flush()
    for handler in access_logger.handlers:
        handler.flush()
