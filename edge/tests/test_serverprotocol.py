"""Kurs's HTTP protocol (`edge.serverprotocol`) on a real uvicorn server and real sockets.

The server's transport is wrapped, below the protocol, in a recorder that counts the writes
reaching the socket: an answer must leave in one, a streamed body chunk by chunk as it is made,
and a WebSocket must get the plain transport.

`KursCycle` writes each response head as uvicorn's own cycle does, byte for byte (hypothesis).

The request-read limits run with an injected clock (`FrozenClock`): the protocol's timer still
fires on the loop (every 50 ms here), but whether a deadline has passed is the test's decision,
so no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from websockets.asyncio.client import connect as ws_connect

from edge.serverprotocol import FLUSH_AT, CoalescingTransport, KursCycle, KursHttpProtocol
from tests.services import free_port, wait_for_port

BODY = b'{"courses":[]}'
BIG_CHUNK = b"x" * 32 * 1024
BIG_CHUNKS = 64


class Recorder:
    """The socket's transport, counting the writes that reach it."""

    writes: list[bytes]

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.writes = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


RECORDERS: list[Recorder] = []
CHANGED = asyncio.Event()  # set by the server side when something a test may wait on changed


def answered() -> list[Recorder]:
    """The connections that were answered (not the probe that waited for the port)."""
    return [recorder for recorder in RECORDERS if recorder.writes]


class RecordedKurs(KursHttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        RECORDERS.append(recorder := Recorder(transport))
        super().connection_made(recorder)  # type: ignore[arg-type]  # a duck-typed Transport


class RecordedStock(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        RECORDERS.append(recorder := Recorder(transport))
        super().connection_made(recorder)  # type: ignore[arg-type]  # a duck-typed Transport


class App:
    """`/` answers start + body; `/stream` sends a chunk, waits for the test, sends the last."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: list[str] = []  # the types of the messages `/echo` received

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            message = await receive()
            await send({"type": "websocket.send", "text": "echo:" + message["text"]})
            await send({"type": "websocket.close", "code": 1000})
            return
        headers = [(b"content-type", b"application/json")]
        if scope["path"] == "/early":  # answers without reading the body, as a refusal does
            headers.append((b"content-length", str(len(BODY)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": BODY})
            return
        if scope["path"] == "/echo":  # answers the length of the body it read
            size = 0
            while True:
                message = await receive()
                self.received.append(message["type"])
                CHANGED.set()
                if message["type"] == "http.disconnect":
                    return
                size += len(message["body"])
                if not message.get("more_body"):
                    break
            body = str(size).encode()
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] == "/big":
            # 2 MiB in 64 chunks, never yielding to the loop in between (send does not block).
            total = len(BIG_CHUNK) * BIG_CHUNKS
            headers.append((b"content-length", str(total).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for n in range(BIG_CHUNKS):
                last = n == BIG_CHUNKS - 1
                await send({"type": "http.response.body", "body": BIG_CHUNK, "more_body": not last})
            return
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"last\n", "more_body": False})
            return
        headers.append((b"content-length", str(len(BODY)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY, "more_body": False})


@contextlib.asynccontextmanager
async def serving(
    protocol: type[HttpToolsProtocol], keep_alive: float = 5
) -> AsyncIterator[tuple[int, App, Any]]:
    global CHANGED
    CHANGED = asyncio.Event()  # one per test: an Event belongs to the loop that first waits on it
    RECORDERS.clear()
    app = App()
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=protocol,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # typed int, used as a float
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.to_thread(wait_for_port, port, 10)
        yield port, app, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


@pytest.mark.parametrize(("protocol", "writes"), [(RecordedKurs, 1), (RecordedStock, 2)])
async def test_an_answer_leaves_in_one_write(
    protocol: type[HttpToolsProtocol], writes: int
) -> None:
    # Stock uvicorn's two writes per answer are what the Kurs protocol saves.
    async with serving(protocol) as (port, _app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in (1, 2):  # two answers on one keep-alive connection
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert body == BODY
            (recorder,) = answered()
            assert len(recorder.writes) == n * writes
            assert recorder.writes[-1].endswith(BODY)
        writer.close()


async def test_a_streamed_chunk_leaves_before_the_next_is_made() -> None:
    async with serving(RecordedKurs) as (port, app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"transfer-encoding: chunked" in head
        # The app is waiting for `release`: the first chunk must have left without it.
        assert await asyncio.wait_for(reader.readuntil(b"first\n\r\n"), 5) == b"6\r\nfirst\n\r\n"
        assert not app.release.is_set()
        app.release.set()
        rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert rest == b"5\r\nlast\n\r\n0\r\n\r\n"
        writer.close()


async def test_connection_close_sends_the_whole_answer_first() -> None:
    async with serving(RecordedKurs) as (port, _app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        everything = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        assert everything.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in everything
        assert everything.endswith(b"\r\n\r\n" + BODY)
        writer.close()


async def test_a_websocket_gets_the_plain_transport() -> None:
    async with (
        serving(RecordedKurs) as (port, _app, server),
        ws_connect(f"ws://127.0.0.1:{port}/ws") as socket,
    ):
        ws_protocols = [
            p for p in server.server_state.connections if not isinstance(p, HttpToolsProtocol)
        ]
        assert len(ws_protocols) == 1
        assert not isinstance(ws_protocols[0].transport, CoalescingTransport)
        await socket.send("hello")
        assert await asyncio.wait_for(socket.recv(), 5) == "echo:hello"


async def test_an_idle_connection_is_closed_by_uvicorns_keep_alive() -> None:
    # Keep-alive between requests is uvicorn's own; the request-read timer must not hold it off.
    async with serving(RecordedKurs, keep_alive=0.2) as (port, _app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await read_response(reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        writer.close()


async def test_a_large_answer_reaches_the_socket_as_it_grows_not_at_the_end_of_the_pass() -> None:
    # Held back only up to FLUSH_AT: the real transport sees the body as it is made, so its
    # high-water mark can pause the app (uvicorn's flow control) as without the protocol.
    async with serving(RecordedKurs) as (port, _app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _head, body = await read_response(reader)
        assert body == BIG_CHUNK * BIG_CHUNKS
        (recorder,) = answered()
        assert len(recorder.writes) >= len(body) // (FLUSH_AT + len(BIG_CHUNK))
        assert max(map(len, recorder.writes)) < FLUSH_AT + len(BIG_CHUNK) + 1024
        writer.close()


# --- Request-read limits: slow or oversized requests ------------------------------------------
class FrozenClock:
    """The deadlines' clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = FrozenClock()
LIMITED: list[Limited] = []


class Limited(KursHttpProtocol):
    """Deadlines on `CLOCK`, checked every 50 ms of real time; counts the timer's checks."""

    HEADER_TIMEOUT = 0.05
    BODY_TIMEOUT = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = CLOCK
        self.checks = 0
        LIMITED.append(self)
        CHANGED.set()

    def _check_deadline(self) -> None:
        self.checks += 1
        super()._check_deadline()
        CHANGED.set()


@dataclass
class Client:
    """One connection to a server on `Limited`, and the server's side of it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: Limited
    app: App

    async def read_all(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), 5)  # until the server closes

    async def checked(self, times: int = 2) -> None:
        """The timer has looked at the deadline `times` more times (so it would have acted)."""
        target = self.protocol.checks + times
        await until(lambda: self.protocol.checks >= target, "the deadline checked")


@pytest_asyncio.fixture
async def client(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Client]:
    caplog.set_level(logging.WARNING)
    CLOCK.now = 0.0
    async with serving(Limited) as (port, app, _server):
        LIMITED.clear()  # not the probe that waited for the port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: bool(LIMITED), "the server's side of the connection")
        yield Client(reader, writer, LIMITED[-1], app)
        writer.close()


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait (5 s at most) for server-side state, woken by each `CHANGED.set()`."""
    try:
        async with asyncio.timeout(5):
            while True:
                CHANGED.clear()
                if check():
                    return
                await CHANGED.wait()
    except TimeoutError:
        raise AssertionError(f"not within 5 s: {what}") from None


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge.serverprotocol"]


def status_and_detail(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.split(b"\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["detail"]


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a", b"408"),
        (b"", b""),  # opened and silent: closed without an answer or a log line
    ],
    ids=["half-sent head", "nothing sent"],
)
async def test_a_head_not_received_by_its_deadline_closes_the_connection(
    client: Client, sent: bytes, answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client.writer.write(sent)
    await client.writer.drain()
    await client.checked()  # the deadline not reached: the timer let it be
    assert not client.protocol.transport.is_closing()
    CLOCK.now += Limited.HEADER_TIMEOUT
    got = await client.read_all()
    if not answer:
        assert (got, refusals(caplog)) == (b"", [])
        return
    reason = "request head not received within 0.05s"
    assert status_and_detail(got) == (408, reason)
    peer = f"127.0.0.1:{client.writer.get_extra_info('sockname')[1]}"
    assert refusals(caplog) == [f"http: {peer} answered 408: {reason}"]


async def test_a_body_shorter_than_its_content_length_is_closed_after_the_body_deadline(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    client.writer.write(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabc")
    await until(lambda: client.app.received == ["http.request"], "the first part of the body")
    CLOCK.now += Limited.HEADER_TIMEOUT  # the head's deadline is past, not the body's
    await client.checked()
    assert not client.protocol.transport.is_closing()
    CLOCK.now += Limited.BODY_TIMEOUT
    assert await client.read_all() == b""  # the app is waiting on the body: nothing to say
    await until(lambda: client.app.received[-1:] == ["http.disconnect"], "the app told")
    assert len(refusals(caplog)) == 1
    assert refusals(caplog)[0].endswith("closed: request body not received within 0.05s")


async def test_each_request_has_its_own_deadline_on_a_keep_alive_connection(
    client: Client,
) -> None:
    # The connection outlives many head timeouts: only the head or body being awaited is timed
    # by them; between requests the wait is keep-alive's (5 s).
    for _ in range(3):
        client.writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _head, body = await read_response(client.reader)
        assert body == BODY
        CLOCK.now += 10 * Limited.HEADER_TIMEOUT  # idle, well within keep-alive's wait
        await client.checked(1)
    client.writer.write(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc")
    _head, body = await read_response(client.reader)
    assert body == b"3"
    assert not client.protocol.transport.is_closing()


async def test_a_request_answered_before_its_body_ends_leaves_the_connection_timed(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # Once the rest of the body is in, the connection is idle: keep-alive's wait applies.
    client.writer.write(b"POST /early HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\na")
    _head, body = await read_response(client.reader)
    assert body == BODY
    client.writer.write(b"bc")
    await until(lambda: not client.protocol._in_body, "the rest of the body read")
    await client.checked()
    assert not client.protocol.transport.is_closing()
    CLOCK.now += 5  # uvicorn's --timeout-keep-alive, as `serving` sets it
    assert await client.read_all() == b""
    assert refusals(caplog) == []  # closed as idle, not for a late body


@pytest.mark.parametrize(("count", "status"), [(100, 200), (101, 431), (1000, 431)])
async def test_at_most_100_headers(
    client: Client, count: int, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    extra = b"".join(b"X-H%d: v\r\n" % n for n in range(count - 1))  # and Host
    client.writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n")
    if status == 200:
        head, body = await read_response(client.reader)
        assert (head.split(b" ")[1], body) == (b"200", BODY)
    else:
        assert status_and_detail(await client.read_all()) == (431, "too many headers")
    assert len(refusals(caplog)) == (status != 200)


@pytest.mark.parametrize(
    ("size", "ends"),
    [(70 * 1024, True), (70 * 1024, False), (1024 * 1024, False)],
    ids=["70 KiB", "70 KiB never-ending", "1 MiB never-ending"],
)
async def test_a_head_over_64_kib_is_answered_431_without_waiting_for_its_end(
    client: Client, size: int, ends: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A never-ending head is cut off as it grows: the frozen clock rules the timeout out. The
    # client's writing all of 1 MiB, after the server has answered, still ends in the answer,
    # not a reset: the server reads and drops the rest before it closes (a lingering close).
    big = b"X-Big: " + b"x" * size + (b"\r\n\r\n" if ends else b"")
    client.writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + big)
    await client.writer.drain()
    assert status_and_detail(await client.read_all()) == (431, "request head too large")
    assert len(refusals(caplog)) == 1


async def test_a_websocket_upgrade_with_too_many_headers_is_answered_431_without_an_error(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    extra = b"".join(b"X-H%d: v\r\n" % n for n in range(200))
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    client.writer.write(upgrade + extra + b"\r\n")
    assert status_and_detail(await client.read_all()) == (431, "too many headers")
    assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.text


async def test_a_large_body_read_with_its_head_is_not_taken_for_a_large_head(
    client: Client,
) -> None:
    body = b"y" * (200 * 1024)
    head = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
    client.writer.write(head % len(body) + body)  # one write: the server reads both at once
    _head, answer = await read_response(client.reader)
    assert answer == str(len(body)).encode()


# --- the response head, as uvicorn writes it -----------------------------------------------------
class Written:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def cycle(kind: type[RequestResponseCycle], method: str, keep_alive: bool) -> Any:
    transport = Written()
    return kind(
        scope={"method": method},  # type: ignore[typeddict-item]  # what `send` reads of it
        transport=transport,  # type: ignore[arg-type]  # a duck-typed Transport
        flow=FlowControl(transport),  # type: ignore[arg-type]  # likewise
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[(b"server", b"uvicorn"), (b"date", b"Mon, 07 Dec 2026 01:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


HEADER_NAMES = st.sampled_from(
    [b"Content-Type", b"ETag", b"Content-Length", b"content-length", b"Transfer-Encoding",
     b"Connection", b"X-Request-ID", b"Bad Name", b"X(1)", b""]
)  # fmt: skip
HEADER_VALUES = st.sampled_from(
    [b"application/json", b"3", b"0", b"chunked", b"Chunked", b"close", b"keep-alive, Close",
     b"keep-alive", b"a\x00b", b"line\nbreak", b"tab\tok", b"\"etag\""]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
    method=st.sampled_from(["GET", "HEAD"]),
    status=st.sampled_from([200, 204, 304, 404]),
    keep_alive=st.booleans(),
    body=st.sampled_from([b"", b"abc"]),
)
def test_kurs_cycle_writes_what_uvicorn_writes(
    headers: list[tuple[bytes, bytes]], method: str, status: int, keep_alive: bool, body: bytes
) -> None:
    """Byte for byte, state for state, error for error; twice, the second from the memo."""

    async def answer(kind: type[RequestResponseCycle]) -> tuple[Any, ...]:
        one = cycle(kind, method, keep_alive)
        outcome: Any = None
        try:
            await one.send({"type": "http.response.start", "status": status, "headers": headers})
            await one.send({"type": "http.response.body", "body": body})
        except (RuntimeError, ValueError) as exc:  # an invalid header; a length not a number
            outcome = repr(exc)
        state = (one.keep_alive, one.chunked_encoding, one.expected_content_length)
        return one.transport.data, state, one.response_complete, outcome

    async def both() -> None:
        for _ in range(2):
            assert await answer(KursCycle) == await answer(RequestResponseCycle)

    asyncio.run(both())
