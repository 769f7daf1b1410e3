"""The one place Kurs reaches into uvicorn below its documented surface.

uvicorn documents its settings (`--http`, `--ws` accept a protocol class) but not the protocol
classes themselves. Kurs subclasses two of them: `edge.serverprotocol.KursHttpProtocol`
(one write per answer, request-read timeouts and header limits) and the WebSocket protocols of
`realtime.wsprotocol` and `rates.emulator.server` (a refused handshake answered, not held), and
the emulator drives `uvicorn.Server` step by step. Every such class is imported from here, and
every undocumented member those subclasses read, set or override is listed below.

`WRITTEN_AGAINST` is the uvicorn these names were read from. `edge/tests/test_uvicorn_compat.py`
fails when another version is installed or a listed name is gone: an upgrade is then a deliberate
act (read the new version's classes, adjust the subclasses, bump the version here), never a
subclass silently overriding a method that is no longer called.

Upstream: request-read timeouts were proposed in Kludex/uvicorn issue #157
(`--timeout-request-start`, `--timeout-request-complete`) and never implemented; a header-count
limit was declined there ("the header size limitation is enough": uvicorn's h11 protocol has
one, its httptools protocol, the one Kurs runs, none). The emulator's refused-handshake fix is
Kludex/uvicorn pull request #3138, open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import Server
from websockets.frames import Frame, Opcode

if TYPE_CHECKING:
    # The message type of the protocols' `send`, which an override must accept whole (asgiref's
    # union lacks uvicorn's early-hint event). A private module: for type checking only.
    from uvicorn._types import ASGISendEvent as ASGISendEvent


WRITTEN_AGAINST = "0.54.0"
PRIVATE_MODULES = ("uvicorn._types",)

# Undocumented members used by Kurs's subclasses and the emulator, per uvicorn class.
# Methods that are overridden are marked so; the rest are read or set.
UNDOCUMENTED: dict[type, tuple[str, ...]] = {
    HttpToolsProtocol: (
        "loop",  # the event loop the protocol schedules its timers on
        "transport",  # replaced by a coalescing wrapper; restored at a WebSocket upgrade
        "client",  # the peer, for the refusal log line
        "url",  # the request target as received, for the head's size
        "headers",  # the request's headers as received, for their count and size
        "on_headers_complete",  # overridden (httptools callback): head limits, body phase
        "on_body",  # overridden (httptools callback): ignored after a refusal
        "on_message_complete",  # overridden (httptools callback): the request is whole
        "handle_websocket_upgrade",  # overridden: the plain transport for WebSocket frames
        # The keep-alive wait, moved onto Kurs's deadline timer: `on_response_complete` is
        # uvicorn 0.54's own but for that wait, so it must be compared with each new version's.
        "on_response_complete",  # overridden, as a copy
        "_unset_keepalive_if_required",  # overridden: uvicorn calls it at each read
        "timeout_keep_alive",  # `--timeout-keep-alive`
        "server_state",
        "flow",
        "pipeline",
        "cycle",  # the current request's; its `response_complete` says whether it was answered
        "_start_asgi_task",  # overridden: the cycle made a `KursCycle` before it runs
    ),
    # `edge.serverprotocol.KursCycle` writes a response's head as uvicorn 0.54's `send` does,
    # with each header's check remembered: `send` must be compared with each new version's.
    RequestResponseCycle: (
        "send",  # overridden: the head's branch as a copy, the body's uvicorn's own
        "scope",
        "transport",
        "flow",
        "disconnected",
        "response_started",
        "waiting_for_100_continue",
        "default_headers",
        "access_log",
        "access_logger",
        "keep_alive",
        "chunked_encoding",
        "expected_content_length",
        "response_complete",  # read by KursHttpProtocol: was the request answered
    ),
    WebSocketsSansIOProtocol: (
        "conn",  # websockets' ServerProtocol (documented by websockets)
        "transport",
        "client",
        "handshake_initiated",
        "handshake_complete",
        "close_sent",
        "frames",  # the fragments of the message being received
        "curr_msg_data_type",  # "text" or "bytes"
        "send_receive_event_to_app",  # overridden: invalid UTF-8 closed with one log line
        "handle_parser_exception",  # called: closes the connection after a protocol error
        "send",  # overridden by the emulator (uvicorn PR #3138)
        # `DirectWrite` (the hub's fan-out) writes pre-framed frames to the transport when
        # these say uvicorn's own send would write at once: the socket's write buffer is below
        # its high-water mark, no close was sent, the connection is not lost.
        "writable",  # an asyncio.Event, cleared by pause_writing
        "disconnected",
    ),
    Server: (
        "startup",  # the emulator runs the server without `serve()`'s signal handlers,
        "main_loop",  # which would take SIGINT from `run_emulator`'s own handler
        "shutdown",
        "lifespan",
        "should_exit",
    ),
}

# The module's names `KursCycle.send` uses as uvicorn's own send does.
HEAD_NAMES = ("HEADER_RE", "HEADER_VALUE_RE", "STATUS_LINE")


def text_frame(text: str) -> bytes:
    """`text` as one unfragmented, unmasked WebSocket text frame on the wire (RFC 6455): the
    bytes uvicorn's send writes for it on a connection without extensions, for any client."""
    return bytes(Frame(Opcode.TEXT, text.encode()).serialize(mask=False))


class DirectWrite:
    """Whole frames (`text_frame`) written straight to one uvicorn WebSocket's transport.

    The fan-out frames each event once and writes the same bytes to every socket; uvicorn's
    send encodes and frames the text again for each socket, and its coroutine, websockets'
    frame and the join cost more than the write itself
    (docs/benchmarks.md#realtime-direct-writes-2026-12-07).
    `ready()` says whether uvicorn's send would write at once; when it would not (the client
    stopped reading, a close was sent, the connection is gone) the caller uses the ASGI send,
    which waits or raises as uvicorn decides. Data frames carry no state in websockets' protocol
    beyond its state (open, closing), which `close_sent` and the transport's closing follow.
    """

    __slots__ = ("_protocol", "_transport", "_writable")

    frame = staticmethod(text_frame)

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport
        self._writable = protocol.writable

    def ready(self) -> bool:
        return (
            self._writable.is_set()
            and not self._protocol.close_sent
            and not self._protocol.disconnected
            and not self._transport.is_closing()
        )

    def write(self, data: bytes) -> None:
        self._transport.write(data)


def direct_write(send: Callable[..., Any]) -> DirectWrite | None:
    """A `DirectWrite` for the socket an ASGI `send` belongs to, once its handshake completed;
    None unless that is uvicorn's websockets sans-I/O protocol with no extension negotiated
    (a compressed connection frames each message with its own state) and the send unwrapped."""
    protocol = getattr(send, "__self__", None)
    if not isinstance(protocol, WebSocketsSansIOProtocol):
        return None
    if getattr(send, "__func__", None) is not WebSocketsSansIOProtocol.send:
        return None  # a subclass's own send (the emulator's) may write otherwise
    if not protocol.handshake_complete or protocol.conn.extensions:
        return None
    return DirectWrite(protocol)


__all__ = [
    "HEADER_RE",
    "HEADER_VALUE_RE",
    "HEAD_NAMES",
    "PRIVATE_MODULES",
    "STATUS_LINE",
    "UNDOCUMENTED",
    "WRITTEN_AGAINST",
    "DirectWrite",
    "HttpToolsProtocol",
    "RequestResponseCycle",
    "Server",
    "WebSocketsSansIOProtocol",
    "direct_write",
    "text_frame",
]
