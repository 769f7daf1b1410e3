"""The HTTP protocol Kurs is served with: uvicorn's httptools protocol, each answer in one send(),
and a client that is slow to send its request, or sends too many or too large headers, refused.

`scripts/serve.sh` selects it (`--http edge.serverprotocol:KursHttpProtocol`).

uvicorn writes a response's head when the app sends `http.response.start` and its body when the
app sends `http.response.body`: two `send()` system calls for every answer. Profiled under wrk
(py-spy, one worker, `/courses` from the fast path), those two writes were the largest cost of a
request, larger than the answer itself. Here the writes an answer makes within one pass of the
event loop leave together: the transport the protocol is given keeps them and sends them as one
buffer when the loop comes round (`loop.call_soon`), or at once when the connection is closed.

Nothing waits longer than that pass: a streamed body (SSE) still leaves chunk by chunk, each as
soon as the app yields to the loop, and a head whose body comes later leaves on its own. Nor is
more than `FLUSH_AT` (64 KiB) kept: a large answer reaches the socket's transport as it grows, so
uvicorn's flow control pauses a fast writer as it would without this protocol. Measured
with `bench/bench_courses.py --servers`: about a quarter more requests per second for the same
CPU, with one worker and with two. A WebSocket upgrade hands the plain transport to the
WebSocket protocol (`realtime.wsprotocol`): its frames keep their own path.

Each response head is written as uvicorn writes it (`KursCycle`), but a header line once checked
(a name and value without the characters HTTP forbids) is remembered with its bytes: an answer of
the edge repeats the same nine or ten headers, and uvicorn's two regular expressions per header
per answer were the largest cost of `/courses` in Python after the edge itself (py-spy under wrk,
docs/benchmarks.md).

The request-read limits are `KursHttpProtocol`'s class attributes (timeouts, header count and
size): a deployment behind nginx has nginx's own, and `make run` gets these. The uvicorn members
the class relies on are listed, and checked against the installed uvicorn, in
`edge._uvicorn_compat`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from edge._uvicorn_compat import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

if TYPE_CHECKING:
    from edge._uvicorn_compat import ASGISendEvent

logger = logging.getLogger(__name__)

# Kept at most this much before handing it on at once: a large answer or a body streamed without
# yielding to the loop reaches the real transport as it grows, whose high-water mark then pauses
# the app as with stock uvicorn (FlowControl), instead of piling up here for the whole pass.
FLUSH_AT = 64 * 1024


class CoalescingTransport:
    """An `asyncio.Transport` whose writes of one loop pass leave in one `write()`.

    Everything else is the wrapped transport's: the hot calls uvicorn makes for each request are
    forwarded explicitly, the rest through `__getattr__`.
    """

    __slots__ = ("_loop", "_pending", "_pending_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_size = 0

    @property
    def wrapped(self) -> asyncio.Transport:
        return self._transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        pending = self._pending
        if not pending:
            self._loop.call_soon(self.flush)
        pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_AT:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Hand what is pending to the real transport (dropped once it is closing: a gone peer)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_size = 0
        transport = self._transport
        if not transport.is_closing():
            transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()  # an answer followed by `Connection: close` still goes out whole
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._pending_size = 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_size

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# Header lines checked once, by (name, value) as the app sent them: (the line, its kind). Kept at
# most MAX_LINES; past it the memo starts over (request ids are new on every answer).
MAX_LINES = 1024
_PLAIN, _LENGTH, _CHUNKED, _CLOSE = range(4)
_lines: dict[tuple[bytes, bytes], tuple[bytes, int]] = {}


def _checked(name: bytes, value: bytes) -> tuple[bytes, int]:
    """The header's line and kind, checked as uvicorn checks it (RuntimeError if invalid)."""
    if HEADER_RE.search(name):
        raise RuntimeError("Invalid HTTP header name.")
    if HEADER_VALUE_RE.search(value):
        raise RuntimeError("Invalid HTTP header value.")
    lower = name.lower()
    kind = _PLAIN
    if lower == b"content-length":
        kind = _LENGTH
    elif lower == b"transfer-encoding" and value.lower() == b"chunked":
        kind = _CHUNKED
    elif lower == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
        kind = _CLOSE
    line = (b"".join((lower, b": ", value, b"\r\n")), kind)
    if len(_lines) >= MAX_LINES:
        _lines.clear()
    _lines[name, value] = line
    return line


class KursCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, writing the response head from remembered lines.

    The head's branch of uvicorn 0.54's `send`, but for the per-header checks (`_checked`, once
    per distinct header); everything else (a body, uvicorn's own access log, a paused or gone
    client) is uvicorn's `send` itself.
    """

    async def send(self, message: ASGISendEvent) -> None:
        if (
            self.response_started
            or message["type"] != "http.response.start"
            or self.access_log
            or self.flow.write_paused
            or self.disconnected
        ):
            await super().send(message)
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for headers in (self.default_headers, message.get("headers", ())):
            for header in headers:
                line, kind = _lines.get(header) or _checked(*header)
                if kind:
                    if kind == _LENGTH:
                        if self.chunked_encoding is None:
                            self.expected_content_length = int(header[1].decode())
                            self.chunked_encoding = False
                    elif kind == _CHUNKED:
                        self.expected_content_length = 0
                        self.chunked_encoding = True
                    else:
                        self.keep_alive = False
                        has_connection_close = True
                content.append(line)
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))


class KursHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `CoalescingTransport`, with request-read limits.

    Without a proxy in front (`make run`), uvicorn waits for a request as long as its client
    likes: a head sent a byte at a time, or a body shorter than its Content-Length, held the
    socket open indefinitely, and neither the number of headers nor their size was bounded. Here:

    - a request head must arrive whole within `HEADER_TIMEOUT` seconds of its first byte (of the
      connection's opening, for the first request): a client that sent part of one is answered
      408 and closed, a connection that never sent a byte is closed without an answer;
    - its body within `BODY_TIMEOUT` seconds more (the whole request within both of its first
      byte), or the connection is closed (the app, waiting on the body, gets `http.disconnect`);
    - a head over `MAX_HEAD_BYTES` (checked as it arrives, so an endless one is cut off) or with
      more than `MAX_HEADERS` headers is answered 431 and the connection closed.

    Each refusal is one WARNING line; an answered one closes as nginx does, reading and dropping
    what the client still sends for `LINGER` seconds so that it gets the answer, not a reset.
    Between requests the connection waits at most uvicorn's
    `--timeout-keep-alive`, then is closed without a word, as with uvicorn.

    One timer per connection serves all three waits (keep-alive, head, body). uvicorn arms a fresh
    keep-alive timer after every answer and cancels it at the next request's first bytes; here a
    phase only moves the deadline, and the timer, when it fires early, sleeps again until the
    deadline. Every wait is at most `_tick` (the shortest of the timeouts) ahead, so a deadline
    is acted on at most that late, and a busy connection makes one timer per `_tick`, not two
    timer calls per request. uvicorn's keep-alive methods (`on_response_complete`,
    `_unset_keepalive_if_required`) are replaced for this; see `edge._uvicorn_compat`.
    """

    HEADER_TIMEOUT = 10.0
    BODY_TIMEOUT = 30.0
    MAX_HEADERS = 100
    MAX_HEAD_BYTES = 64 * 1024
    LINGER = 2.0  # after a refusal, how long what the client still sends is read and dropped

    _clock: Callable[[], float]
    _deadline: float | None = None  # when the phase the client owes us must be over
    _in_body = False
    _head_bytes = 0  # received since the current head began (with any body in the same read)
    _watchdog: asyncio.TimerHandle | None = None
    _refused = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = self.loop.time  # the deadlines' clock: a test's subclass injects its own
        self._tick = min(self.timeout_keep_alive, self.HEADER_TIMEOUT, self.BODY_TIMEOUT)

    # uvicorn types the transport as asyncio.Transport; CoalescingTransport stands in for one.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self._start_phase(self.HEADER_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watchdog()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what the client still sends is dropped (see _refuse)
        if self._in_body:
            super().data_received(data)
            return
        if not self._head_bytes:  # a request's first bytes: its head's deadline starts
            self._deadline = self._clock() + self.HEADER_TIMEOUT  # _start_phase, inlined (hot)
            if self._watchdog is None:
                self._arm(self.HEADER_TIMEOUT)
        self._head_bytes += len(data)
        super().data_received(data)
        # Read again (a declared local, which mypy does not narrow to the False tested above):
        # the call just made may have ended the head, on_headers_complete setting it.
        in_body: bool = self._in_body
        if not in_body and self._head_bytes > self.MAX_HEAD_BYTES:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if len(self.headers) > self.MAX_HEADERS:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
            return
        if self._head_bytes > self.MAX_HEAD_BYTES and self._head_size() > self.MAX_HEAD_BYTES:
            # The whole head came in one large read (counted above with any body it carried).
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            return
        self._in_body = True
        self._head_bytes = 0
        if self._deadline is not None:
            # The body's deadline follows the head's (no clock read: a GET's body ends at once).
            self._deadline += self.BODY_TIMEOUT
        else:  # a pipelined request, parsed in the read that ended the one before
            self._start_phase(self.BODY_TIMEOUT)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        super().on_message_complete()
        # uvicorn annotates `cycle` without None, yet it is None until a request that is not an
        # upgrade has had its head read.
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is not None and cycle.response_complete:
            # Answered before its body was in (a refusal, say): idle now, so keep-alive's wait.
            self._start_phase(self.timeout_keep_alive)
        else:
            self._deadline = None  # the app has the request: the client owes nothing now

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Made by uvicorn's on_headers_complete; its task has not run yet, so every `send` of
        # the request is KursCycle's.
        cycle.__class__ = KursCycle
        super()._start_asgi_task(cycle, app)

    def _unset_keepalive_if_required(self) -> None:
        pass  # uvicorn's keep-alive timer is the deadline timer here: data_received moves it on

    def on_response_complete(self) -> None:
        # uvicorn 0.54's own but for the keep-alive wait, a phase of the deadline timer here.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._deadline is None:  # not already reading the client's next request
            self._deadline = self._clock() + self.timeout_keep_alive  # _start_phase, inlined
            if self._watchdog is None:
                self._arm(self.timeout_keep_alive)

    def handle_websocket_upgrade(self) -> None:
        if self._refused:
            return  # the upgrade request was refused (431) before uvicorn took it in
        self._deadline = None
        self._stop_watchdog()
        # uvicorn annotates it as an asyncio.Transport; connection_made installed the wrapper.
        transport: asyncio.Transport | CoalescingTransport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()
            self.transport = transport.wrapped
        super().handle_websocket_upgrade()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _start_phase(self, timeout: float) -> None:
        self._deadline = self._clock() + timeout
        if self._watchdog is None:
            self._arm(timeout)

    def _arm(self, delay: float) -> None:
        self._watchdog = self.loop.call_later(min(delay, self._tick), self._check_deadline)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check_deadline(self) -> None:
        self._watchdog = None
        deadline = self._deadline
        if deadline is None or self.transport.is_closing():
            return  # nothing owed: the next phase arms the timer again
        remaining = deadline - self._clock()
        if remaining > 0:
            self._arm(remaining)
        elif self._refused:
            self.transport.close()  # the lingering after a refusal is over
        elif self._in_body:
            self._close(f"request body not received within {self.BODY_TIMEOUT:g}s")
        elif self._head_bytes:
            self._refuse(
                HTTPStatus.REQUEST_TIMEOUT,
                f"request head not received within {self.HEADER_TIMEOUT:g}s",
            )
        else:
            self.transport.close()  # idle (keep-alive) or opened and silent: nothing to say

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        """Answer `status`, then close as nginx does (a lingering close): the answer and our FIN
        leave now, and what the client is still sending is read and dropped for `LINGER`
        seconds at most (the connection ends sooner if the client closes its side). Closing at
        once, with its request unread, would make our kernel reset the connection, and a
        client still writing would get the reset instead of the answer."""
        if self._refused or self.transport.is_closing():
            return
        self._log(f"answered {status.value}", reason)
        self._refused = True
        self.transport.write(refusal(status, reason))
        self.transport.write_eof()
        self._start_phase(self.LINGER)

    def _close(self, reason: str) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._log("closed", reason)
        self._refused = True
        self._deadline = None
        self._stop_watchdog()
        self.transport.close()

    def _log(self, outcome: str, reason: str) -> None:
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown peer"
        logger.warning("http: %s %s: %s", peer, outcome, reason)


def refusal(status: HTTPStatus, detail: str) -> bytes:
    """A whole `Connection: close` answer with a JSON `detail`, as every Kurs error has."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
