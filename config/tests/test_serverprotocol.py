"""Kurs's HTTP protocol (`config.serverprotocol`) on a real uvicorn server and real sockets.

The server's transport is wrapped, below the protocol, in a recorder that counts the writes
reaching the socket: an answer must leave in one, a streamed body chunk by chunk as it is made,
and a WebSocket must get the plain transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect as ws_connect

from config.serverprotocol import FLUSH_AT, CoalescingTransport, KursHttpProtocol
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


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with serving(RecordedKurs, keep_alive=0.4) as (port, _app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await read_response(reader)
        idle_from = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        assert 0.35 <= loop.time() - idle_from < 2.0
        writer.close()


async def test_a_connection_in_use_outlives_the_keep_alive_timeout() -> None:
    # Requests every 0.15 s for 1.2 s on one connection with a 0.4 s timeout: the lazy timer
    # fires during the run and must find the connection busy or freshly idle, never close it.
    async with serving(RecordedKurs, keep_alive=0.4) as (port, _app, _server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = 0
        while loop.time() - started < 1.2:
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            _head, body = await read_response(reader)
            assert body == BODY
            answers += 1
            await asyncio.sleep(0.15)  # the client's pace, below the timeout
        assert answers >= 6
        (recorder,) = answered()  # one connection throughout
        assert len(recorder.writes) == answers
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
