"""A stale pooled keep-alive connection is retried once, not reported as a provider error.

The server here is real (asyncio on 127.0.0.1) and plays an exchange whose idle timer fires just
as the next request arrives: it answers the first request of a connection with keep-alive, then
closes that connection when the next request comes in on it, without an answer. That is the
race behind "Server disconnected without sending a response" on a reused connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx
import pytest

from rates.providers import Pair, ProviderConnectionError, Quote
from rates.providers.base import Provider

BODY = b'{"ok": true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


@dataclass
class IdleClosingServer:
    port: int = 0
    answered: int = 0
    dropped: int = 0
    # When set, every connection is dropped on its first request too: a provider that is down.
    always_drop: bool = False
    connections: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                if served >= 1 or self.always_drop:
                    self.dropped += 1
                    return  # closed as the request arrives: no status line, no body
                writer.write(RESPONSE)
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[IdleClosingServer]:
    state = IdleClosingServer()
    tcp = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = tcp.sockets[0].getsockname()[1]
    async with tcp:
        yield state
        tcp.close()
        for writer in state.connections:
            writer.close()


class Probe(Provider):
    name = "probe"

    def supports(self, pair: Pair) -> bool:
        return True

    async def fetch(self, pairs: Sequence[Pair]) -> list[Quote]:
        body, _ = await self.get_json("/ticker")
        assert body == {"ok": True}
        return []


async def test_it_retries_a_reused_connection_the_server_closed_once(
    server: IdleClosingServer,
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        provider = Probe(rest_url=f"http://127.0.0.1:{server.port}", client=client)
        for _ in range(3):
            await provider.fetch([])  # would raise ProviderConnectionError without the retry
    # Polls 2 and 3 each met a stale connection and were answered on a fresh one.
    assert server.dropped == 2
    assert server.answered == 3


async def test_it_reports_a_provider_that_drops_the_fresh_connection_too(
    server: IdleClosingServer,
) -> None:
    server.always_drop = True
    async with httpx.AsyncClient(timeout=5) as client:
        provider = Probe(rest_url=f"http://127.0.0.1:{server.port}", client=client)
        with pytest.raises(ProviderConnectionError, match="disconnected"):
            await provider.fetch([])
    assert server.dropped == 2  # the request and one retry, no more
