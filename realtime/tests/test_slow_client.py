"""A deliberately slow client over real TCP (uvicorn in this process): its rate updates coalesce,
then it is closed with 1013, while a fast client on the same pair keeps receiving.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from websockets.asyncio.client import connect as ws_connect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Origin
from websockets.uri import parse_uri

from items.models import Item
from realtime import events, hub
from realtime import nats as realtime_nats
from realtime.hub import CLOSE_TRY_AGAIN_LATER
from realtime.tests.conftest import serving
from tests.services import NatsServer

pytestmark = pytest.mark.django_db(transaction=True)

PAIR = "BTC-USD"
UPDATES = 3000


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch, own_nats: NatsServer) -> AsyncIterator[int]:
    """uvicorn serving Kurs in this process; events travel over a real NATS."""

    monkeypatch.setattr(hub, "SEND_TIMEOUT_S", 0.5)
    await sync_to_async(Item.objects.get_or_create)(base="BTC", quote="USD")
    listener = socket.socket()
    # Accepted sockets inherit a small send buffer: a client that stops reading blocks the
    # server's send after a few frames instead of after megabytes of kernel buffering.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    listener.bind(("127.0.0.1", 0))
    async with serving(listener) as port:
        yield port


class SlowClient:
    """A WebSocket client that reads nothing until told to: a raw socket and websockets' sans-I/O
    protocol, so no library reads ahead into its own buffers on its behalf."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.protocol = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws/items?pairs={PAIR}"),
            origin=Origin(f"http://127.0.0.1:{port}"),
        )
        self.messages: list[str] = []

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        self.protocol.send_request(self.protocol.connect())
        await self._flush()
        while self.protocol.state is State.CONNECTING:
            await self._read_some()

    async def read_until_closed(self) -> int | None:
        """Read everything that reached us, answer the close, return the close code."""
        while self.protocol.state is not State.CLOSED:
            if not await self._read_some():
                break
        return self.protocol.close_code

    async def _read_some(self) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.messages.append(bytes(event.data).decode())
        await self._flush()
        return bool(data)

    async def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                await asyncio.get_running_loop().sock_sendall(self.sock, chunk)

    def close(self) -> None:
        self.sock.close()


def publish_updates() -> None:
    for i in range(UPDATES):
        events.publish(
            "rate.updated",
            {
                "direction": PAIR,
                "value": i,
                "provider": "binance",
                "source_time": "2026-11-23T06:00:00Z",
                "derived": False,
                # Large enough that a few hundred unsent frames fill the buffers.
                "pad": "x" * 512,
            },
        )
        if i % 5 == 0:
            time.sleep(0.002)  # a busy exchange stream over a second or two, not one burst


async def test_a_slow_client_is_coalesced_then_closed_while_a_fast_one_keeps_up(
    server: int,
) -> None:
    fast = await ws_connect(
        f"ws://127.0.0.1:{server}/ws/items?pairs={PAIR}",
        origin=Origin(f"http://127.0.0.1:{server}"),
    )
    slow = SlowClient(server)
    reader: asyncio.Task[None] | None = None
    try:
        assert json.loads(await fast.recv())["type"] == "snapshot"
        (fast_queue,) = hub.hub.sockets()
        await slow.connect()
        async with asyncio.timeout(10):  # the slow client's end of the hub, once registered
            while len(hub.hub.sockets()) < 2:  # noqa: ASYNC110 (the hub has no event for it)
                await asyncio.sleep(0.01)
        (slow_queue,) = set(hub.hub.sockets()) - {fast_queue}
        assert await asyncio.to_thread(realtime_nats.wait_connected, 10)
        latencies: list[float] = []
        values: list[int] = []
        # Updates the fast client got while a send to the slow one was blocked (it reads
        # nothing), before the hub closed it: were the slow send holding the others up, none.
        while_slow_blocked = 0
        last = asyncio.Event()

        async def read_fast() -> None:
            nonlocal while_slow_blocked
            async for raw in fast:
                message = json.loads(raw)
                if message["type"] != "rate.updated":
                    continue
                if slow_queue._sending_since is not None and not slow_queue.kicked:
                    while_slow_blocked += 1
                sent = datetime.fromisoformat(message["ts"]).timestamp()
                latencies.append(time.time() - sent)
                values.append(message["data"]["value"])
                if message["data"]["value"] == UPDATES - 1:
                    last.set()

        reader = asyncio.create_task(read_fast())
        publisher = threading.Thread(target=publish_updates)
        publisher.start()
        async with asyncio.timeout(30):
            await last.wait()
        publisher.join()

        # The fast client got the latest value, and updates all the while the slow one's send
        # was blocked; coalescing may skip values, never reorder. Its latency is printed, not
        # bounded: on a loaded CI machine a latency bound measures the machine.
        assert values == sorted(values)
        assert while_slow_blocked > 0, "the fast client got nothing while the slow one blocked"
        p99 = statistics.quantiles(latencies, n=100)[98]
        print(
            f"fast client: {while_slow_blocked} updates while the slow one blocked; p99 {p99:.3f} s"
        )

        # Now the slow client reads what reached it: coalesced updates, then the 1013 close.
        async with asyncio.timeout(20):
            close_code = await slow.read_until_closed()
        assert close_code == CLOSE_TRY_AGAIN_LATER
        slow_values = [
            m["data"]["value"]
            for m in map(json.loads, slow.messages)
            if m["type"] == "rate.updated"
        ]
        assert json.loads(slow.messages[0])["type"] == "snapshot"
        assert slow_values == sorted(slow_values)
        assert len(slow_values) < UPDATES - 1, "the slow client should have missed updates"
        assert slow_values[-1] < UPDATES - 1, "it was closed before it caught up"
    finally:
        if reader is not None:
            reader.cancel()
        slow.close()
        await fast.close()


async def test_frames_written_directly_are_the_frames_uvicorn_sends(server: int) -> None:
    """A socket with no extension gets each event's frame bytes, made once, written directly; one
    with permessage-deflate goes through uvicorn's send; both read the same messages."""
    url, origin = f"ws://127.0.0.1:{server}/ws/items?pairs={PAIR}", f"http://127.0.0.1:{server}"
    plain = await ws_connect(url, origin=Origin(origin), compression=None)
    deflated = await ws_connect(url, origin=Origin(origin))
    try:
        assert deflated.protocol.extensions, "permessage-deflate was not negotiated"
        for client in (plain, deflated):
            assert json.loads(await client.recv())["type"] == "snapshot"
        assert sorted(q.writes_directly for q in hub.hub.sockets()) == [False, True]
        assert await asyncio.to_thread(realtime_nats.wait_connected, 10)
        for value in range(20):
            events.publish(
                "rate.updated",
                {
                    "direction": PAIR,
                    "value": value,
                    "provider": "binance",
                    "source_time": "2026-11-23T06:00:00Z",
                    "derived": False,
                    # Frames of every length form (7-bit, 16-bit), not all ASCII.
                    "pad": "é" * value * 9,
                },
            )

        async def read(client: Any) -> list[str]:
            frames: list[str] = []
            while not frames or json.loads(frames[-1])["data"]["value"] != 19:
                frames.append(str(await client.recv()))
            return frames

        async with asyncio.timeout(10):
            received = [await read(plain), await read(deflated)]
        assert received[0] == received[1]
        assert [json.loads(f)["data"]["value"] for f in received[0]] == list(range(20))
    finally:
        await plain.close()
        await deflated.close()
