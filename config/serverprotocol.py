"""The HTTP protocol Kurs is served with: uvicorn's httptools protocol, each answer in one send().

`scripts/serve.sh` selects it (`--http config.serverprotocol:KursHttpProtocol`).

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
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class KursHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `CoalescingTransport`, with a lazy keep-alive timer.

    uvicorn arms a `call_later` for its keep-alive timeout after every answer and cancels it on
    the next request's first bytes: a timer made and thrown away per request. Here one timer per
    idle spell notes when the connection went idle; if a request came meanwhile it does nothing,
    and the next answer arms it again. The timeout itself is uvicorn's (`--timeout-keep-alive`).
    """

    _idle_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # busy: an armed timer finds it so and lets the connection be

    def on_response_complete(self) -> None:
        # uvicorn 0.54's own, but for the timer (`_keep_alive_check`).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_check
            )

    def _keep_alive_check(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:
            return  # a request is being served: its answer arms the timer again
        remaining = idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self._keep_alive_check)
        else:
            self.timeout_keep_alive_handler()

    def handle_websocket_upgrade(self) -> None:
        transport = self.transport
        if isinstance(transport, CoalescingTransport):
            transport.flush()
            self.transport = transport.wrapped
        super().handle_websocket_upgrade()
