"""Realtime benchmarks: fan-out to 1,000 sockets, publish-to-socket latency, resume, SSE,
tick-to-socket.

    .venv/bin/python bench/bench_realtime.py [--sockets 1000] [--events 50] [--repeat 3]
    (shorter: --repeat 1 --latency-events 50 --skip-group-send --skip-full-path --skip-sse)
    --profile DIR: py-spy the web process and the fetcher (folded stacks in DIR)
    --database-url postgres://...: the production database instead of a fresh SQLite file

One uvicorn web process (started here, on a free port) serves both `/ws/items` (Kurs: NATS with
JetStream -> ordered consumer -> bridge -> hub -> per-socket queues, every frame with its `seq`)
and `/ws/baseline` (a plain Channels consumer in a group, fed by `group_send` over channels-redis:
the textbook Channels broadcast). The raw baselines run in a process of their own: a
`websockets` server and a bare asyncio SSE server that subscribe to the same NATS subjects and
write each message to every connected client, the practical limit of a Python server. Every
`--policy-every`th Kurs socket has a delivery policy (`min_change`, set so that every update
passes: the counts stay exact and the policy is evaluated on each). The clients are minimal
WebSocket and HTTP connections from this process (the SSE readers count events as `curl -N`
would print them); the nats-server (`-js`, a store in a temporary folder) is started here.
Everything shares the machine's cores, so the figures are for the whole path on one box, not
the server alone. Needs Redis on 127.0.0.1:6379 (the group_send baseline; DB 6) and
`.venv/bin/nats-server`.

Figures (each run's, then the median of --repeat runs, with the ratio to the in-run baseline):
1. deliveries/s to N sockets: Kurs against the raw websockets server (target >= 0.5x) and the
   group_send baseline; and each server's CPU per delivery (from /proc: barely moved by the
   load of other processes, unlike the wall clock);
2. latency from `events.publish()` until all N sockets have the event: median and p99
   (target p99 < 50 ms), and the web process's CPU per event;
3. resume: --resume-rounds disconnect/reconnect rounds with `?since=`: events expected,
   received, duplicated, missing;
4. SSE: deliveries/s to --sse-clients readers of `/api/v1/stream`, against the raw SSE server;
5. the full path: the emulator's Binance stream pushes a price (control call) -> `run_fetch
   --watch` -> accept_quote -> NATS -> web -> socket: median and p99, against a bare client on
   the emulator's stream (target median <= 3x), with the share up to NATS (the fetcher's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script from bench/: the project's packages come from the repository root.
sys.path.insert(0, str(REPO))

from tests.services import free_port, wait_for_port  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
REDIS_URL = "redis://127.0.0.1:6379/6"
BASELINE_GROUP = "bench-baseline"
# A delivery policy that every bench update passes: each moves its pair's value by at least 1
# on ~54,000.
POLICY_QUERY = "?min_change=0.00001"


# --- the server process ------------------------------------------------------------------------
def serve(port: int) -> None:
    """`--serve PORT`: Kurs's /ws/items and the Channels baseline on one uvicorn server."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    import uvicorn
    from channels.generic.websocket import AsyncWebsocketConsumer
    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.core.asgi import get_asgi_application

    from realtime.bridge import lifespan
    from realtime.consumers import ItemsConsumer
    from realtime.routing import consumer_path

    class BaselineConsumer(AsyncWebsocketConsumer):
        async def connect(self) -> None:
            await self.channel_layer.group_add(BASELINE_GROUP, self.channel_name)
            await self.accept()
            await self.send(text_data='{"type":"joined"}')

        async def disconnect(self, code: int) -> None:
            await self.channel_layer.group_discard(BASELINE_GROUP, self.channel_name)

        async def bench_event(self, event: dict[str, Any]) -> None:
            await self.send(text_data=event["text"])

    application = ProtocolTypeRouter(
        {
            "http": get_asgi_application(),
            "websocket": URLRouter(
                [
                    consumer_path("ws/items", ItemsConsumer),
                    consumer_path("ws/baseline", BaselineConsumer),
                ]
            ),
            "lifespan": lifespan,
        }
    )
    uvicorn.run(application, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


def raw_serve(port: int, sse_port: int) -> None:
    """`--raw-serve PORT SSE_PORT`: the raw baselines, NATS -> every client, as WebSocket
    (`websockets.broadcast`) and as Server-Sent Events (asyncio streams)."""
    asyncio.run(_raw_broadcast(port, sse_port))


async def _raw_broadcast(port: int, sse_port: int) -> None:
    import nats
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    clients: set[ServerConnection] = set()
    sse_clients: set[asyncio.StreamWriter] = set()

    async def handler(connection: ServerConnection) -> None:
        clients.add(connection)
        try:
            await connection.send('{"type":"joined"}')
            await connection.wait_closed()
        finally:
            clients.discard(connection)

    async def sse_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The least an SSE server can do: headers, then each event written to every reader
        # (the body ends with the connection, so no chunked framing).
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
                b'event: joined\ndata: {"type":"joined"}\n\n'
            )
            sse_clients.add(writer)
            await reader.read()  # until the client goes away
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            sse_clients.discard(writer)
            writer.close()

    async def on_message(message: Any) -> None:
        # The envelope as published, as text: what Kurs sends (less its `seq`).
        broadcast(clients, message.data.decode())
        if sse_clients:
            event = b"event: event\ndata: " + message.data + b"\n\n"
            for writer in sse_clients:
                writer.write(event)

    client = await nats.connect(os.environ["NATS_URL"])
    await client.subscribe(f"{os.environ['KURS_NATS_PREFIX']}.>", cb=on_message)
    sse_server = await asyncio.start_server(sse_handler, "127.0.0.1", sse_port)
    async with sse_server, serve(handler, "127.0.0.1", port, compression=None):
        await asyncio.get_running_loop().create_future()


# --- minimal WebSocket clients -----------------------------------------------------------------
class Client(asyncio.Protocol):
    """Just enough WebSocket to count text frames cheaply (answers pings, so it stays open)."""

    def __init__(self, port: int, path: str, on_text: Callable[[Client, bytes], None]) -> None:
        self.port = port
        self.path = path
        self.on_text = on_text
        self.buffer = bytearray()
        self.open = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: http://127.0.0.1:{self.port}\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(bytes(buffer[:end]).decode()))
                return
            del buffer[: end + 4]
            self.open = True
            self.opened.set_result(None)
        offset = 0
        size = len(buffer)
        while size - offset >= 2:
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 4], "big")
                start = offset + 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = int.from_bytes(buffer[offset + 2 : offset + 10], "big")
                start = offset + 10
            end = start + length
            if end > size:
                break
            opcode = buffer[offset] & 0x0F
            if opcode == 0x1:
                self.count += 1
                self.on_text(self, bytes(buffer[start:end]))
            elif opcode == 0x9 and self.transport is not None:
                # Pong with an all-zero mask: the payload goes as it is.
                payload = bytes(buffer[start:end])
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            offset = end
        if offset:
            del buffer[:offset]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Fanout:
    """N clients on one path and a counter that fires when all have `target` frames."""

    def __init__(
        self, port: int, path: str, sockets: int, *, policy_every: int = 0, policy_query: str = ""
    ) -> None:
        self.port, self.path, self.sockets = port, path, sockets
        self.policy_every, self.policy_query = policy_every, policy_query
        self.clients: list[Client] = []
        self.last_frame = b""
        self.target = 0
        self.reached = 0
        self.done: asyncio.Event = asyncio.Event()
        self.done_at = 0.0

    def path_for(self, index: int) -> str:
        if self.policy_every and index % self.policy_every == 0:
            return self.path + self.policy_query
        return self.path

    def on_text(self, client: Client, frame: bytes) -> None:
        if self.clients and client is self.clients[0]:
            self.last_frame = frame
        if client.count == self.target:
            self.reached += 1
            if self.reached == self.sockets:
                self.done_at = time.perf_counter()
                self.done.set()

    def expect(self, frames_each: int) -> None:
        self.target = frames_each
        self.reached = sum(1 for c in self.clients if c.count >= frames_each)
        self.done = asyncio.Event()
        if self.reached == self.sockets:
            self.done.set()

    async def connect(self, first_frames: int = 1) -> None:
        loop = asyncio.get_running_loop()
        self.expect(first_frames)
        for batch_start in range(0, self.sockets, 100):
            batch = []
            for index in range(batch_start, min(self.sockets, batch_start + 100)):
                path = self.path_for(index)
                batch.append(
                    loop.create_connection(
                        partial(Client, self.port, path, self.on_text),
                        "127.0.0.1",
                        self.port,
                    )
                )
            for _, client in await asyncio.gather(*batch):
                self.clients.append(client)
        await asyncio.gather(*(c.opened for c in self.clients))
        await asyncio.wait_for(self.done.wait(), 60)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


# --- measurements -----------------------------------------------------------------------------
_versions = iter(range(1, 10**9))


def bench_rate(index: int) -> dict[str, Any]:
    """The next `rate.updated` (docs/events.md#envelope-and-event-types) of pair number `index`; the
    value moves by 1.

    Each event of a burst is for another pair: the hub coalesces a pair's updates that wait
    unsent (the latest wins), which would make the deliveries fewer than the events.
    """
    from django.utils import timezone

    version = next(_versions)
    now = timezone.now()
    return {
        "direction": f"B{index}-USD",
        "value": Decimal(54000 + version),
        "provider": "binance",
        "source_time": now,
        "checked_at": now,
        "status": "live",
        "derived": False,
        "route": [],
        "version": version,
    }


async def publish_throughput(fanout: Fanout, events: int) -> float:
    """`events.publish()` -> NATS -> the server under test -> every socket."""
    from realtime import events as realtime_events

    base = fanout.clients[0].count
    fanout.expect(base + events)
    started = time.perf_counter()
    for i in range(events):
        realtime_events.publish("rate.updated", bench_rate(i))
    try:
        await asyncio.wait_for(fanout.done.wait(), 120)
    except TimeoutError:
        got = sum(min(c.count - base, events) for c in fanout.clients)
        total = fanout.sockets * events
        raise SystemExit(f"bench: {fanout.path} lost messages ({got} of {total})") from None
    return fanout.sockets * events / (fanout.done_at - started)


async def baseline_throughput(fanout: Fanout, events: int, layer: Any) -> float:
    from config.jsonenc import dumps
    from realtime.events import make_envelope

    base = fanout.clients[0].count
    fanout.expect(base + events)
    started = time.perf_counter()
    for i in range(events):
        envelope = make_envelope("rate.updated", bench_rate(i))
        await layer.group_send(BASELINE_GROUP, {"type": "bench.event", "text": dumps(envelope)})
    try:
        await asyncio.wait_for(fanout.done.wait(), 300)
    except TimeoutError:
        got = sum(min(c.count - base, events) for c in fanout.clients)
        total = fanout.sockets * events
        raise SystemExit(f"bench: baseline lost messages ({got} of {total})") from None
    return fanout.sockets * events / (fanout.done_at - started)


async def kurs_latency(fanout: Fanout, events: int) -> list[float]:
    from realtime import events as realtime_events

    latencies = []
    for i in range(events):
        base = fanout.clients[0].count
        fanout.expect(base + 1)
        started = time.perf_counter()
        realtime_events.publish("provider.state", {"name": "bench", "state": "closed", "reason": i})
        await asyncio.wait_for(fanout.done.wait(), 30)
        latencies.append(fanout.done_at - started)
        await asyncio.sleep(0.02)  # one event at a time: latency, not queueing
    return latencies


async def full_path_latency(
    port: int,
    emulator_port: int,
    ticks: int,
    on_nats: list[float],
    beside: dict[str, float],
    on_bare: list[float],
) -> list[float]:
    """Set BTCUSDT on the emulator; time until a socket on BTC-USD has that value.

    A plain NATS subscriber in this process notes when the event is on the bus: `on_nats` gets
    the tick -> NATS part of each latency (the fetcher's share; the rest is the web's).
    `beside` is filled by a bare client in a process of its own (`bare_beside`), on the same
    stream at the same time: `on_bare` gets its latency for the same ticks.
    """
    import nats

    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[float]] = {}
    on_bus: dict[str, float] = {}

    async def bus_message(msg: Any) -> None:
        data = json.loads(msg.data)["data"]
        on_bus[str(Decimal(str(data["value"])).normalize())] = time.perf_counter()

    bus = await nats.connect(os.environ["NATS_URL"])
    await bus.subscribe(f"{os.environ['KURS_NATS_PREFIX']}.rates.BTC-USD", cb=bus_message)
    await bus.flush()

    def on_text(client: Client, frame: bytes) -> None:
        message = json.loads(frame)
        if message.get("type") == "rate.updated":
            value = str(Decimal(str(message["data"]["value"])).normalize())
            future = waiting.pop(value, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

    _, client = await loop.create_connection(
        lambda: Client(port, "/ws/items?pairs=BTC-USD", on_text), "127.0.0.1", port
    )
    await client.opened
    latencies = []
    price = Decimal("90000")
    try:
        for i in range(ticks + 3):
            price += Decimal("1.25")
            key = str(price.normalize())
            # Held here too: the frame may arrive (and on_text pop it) before set_price returns.
            arrived = waiting[key] = loop.create_future()
            started = time.perf_counter()
            await asyncio.to_thread(set_price, emulator_port, str(price))
            try:
                # The first ticks also wait for the fetcher's start-up (over 10 s on a machine
                # other sessions load: Django, the stream's connection, the first REST poll).
                received = await asyncio.wait_for(arrived, 10 if i >= 3 else 60)
            except TimeoutError:
                raise SystemExit(f"bench: emulator tick {price} never reached the socket") from None
            if i >= 3:  # the first ticks warm up the stream and the breaker
                latencies.append(received - started)
                if key in on_bus:
                    on_nats.append(on_bus[key] - started)
                if key in beside:
                    on_bare.append(beside[key] - started)
            await asyncio.sleep(0.1)
    finally:
        client.close()
        await bus.close()
    return latencies


async def bare_stream_latency(emulator_port: int, ticks: int, start: Decimal) -> list[float]:
    """Baseline for the full path: the same price change, read straight off the emulator's
    Binance stream by a bare websockets client (the exchange side alone, no Kurs)."""
    import websockets

    url = f"ws://127.0.0.1:{emulator_port}/binance/stream?streams=btcusdt@ticker"
    latencies = []
    price = start
    async with websockets.connect(url) as stream:
        for i in range(ticks + 3):
            price += Decimal("1.25")
            started = time.perf_counter()
            await asyncio.to_thread(set_price, emulator_port, str(price))
            while True:
                frame = json.loads(await asyncio.wait_for(stream.recv(), 10))
                if Decimal(frame["data"]["c"]) == price:
                    break
            if i >= 3:
                latencies.append(time.perf_counter() - started)
    return latencies


def bare_listen(emulator_port: int) -> None:
    """`--bare-listen PORT`: a bare client on the emulator's BTCUSDT stream, in its own process,
    printing each price with the moment it arrived (`time.perf_counter()`: CLOCK_MONOTONIC,
    one clock for every process of this machine)."""
    import websockets

    async def listen() -> None:
        url = f"ws://127.0.0.1:{emulator_port}/binance/stream?streams=btcusdt@ticker"
        async with websockets.connect(url) as stream:
            print("ready", flush=True)
            async for frame in stream:
                arrived = time.perf_counter()
                price = Decimal(json.loads(frame)["data"]["c"]).normalize()
                print(f"{price} {arrived:.6f}", flush=True)

    asyncio.run(listen())


@contextlib.asynccontextmanager
async def bare_beside(emulator_port: int) -> AsyncIterator[dict[str, float]]:
    """The `--bare-listen` process while the full path is measured: {price: arrival}."""
    process = await asyncio.create_subprocess_exec(
        PYTHON, __file__, "--bare-listen", str(emulator_port), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    arrivals: dict[str, float] = {}

    async def read(stdout: asyncio.StreamReader) -> None:
        async for line in stdout:
            price, arrived = line.decode().split()
            arrivals.setdefault(price, float(arrived))

    try:
        ready = await asyncio.wait_for(process.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise SystemExit(f"bench: the bare client did not connect: {ready!r}")
        reader = asyncio.create_task(read(process.stdout))
        yield arrivals
    finally:
        process.terminate()
        await process.wait()
        with contextlib.suppress(Exception):
            await reader


class SseReader(asyncio.Protocol):
    """One `curl -N`: a GET, then count the events (`data:` lines) of the body as they come."""

    MARK = b"\ndata: "

    def __init__(self, port: int, path: str, on_event: Callable[[SseReader], None]) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\nUser-Agent: curl/8\r\n\r\n"
        ).encode()
        self.on_event = on_event
        self.head = bytearray()
        self.tail = b""
        self.count = 0
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 200"):
                self.opened.set_exception(RuntimeError(bytes(self.head[:end]).decode()))
                return
            self.opened.set_result(None)
            data = b"\n" + bytes(self.head[end + 4 :])
            self.head.clear()
        # A mark split across two reads is found in the last bytes of one plus the next.
        chunk = self.tail + data
        found = chunk.count(self.MARK)
        self.tail = chunk[-(len(self.MARK) - 1) :]
        for _ in range(found):
            self.count += 1
            self.on_event(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SseClients:
    """N curl-like readers of one event stream, and a counter that fires when all have `target`."""

    def __init__(self, port: int, path: str, clients: int) -> None:
        self.port, self.path, self.clients = port, path, clients
        self.readers: list[SseReader] = []
        self.target = 0
        self.reached = 0
        self.done = asyncio.Event()
        self.done_at = 0.0

    def on_event(self, reader: SseReader) -> None:
        if reader.count == self.target:
            self.reached += 1
            if self.reached == self.clients:
                self.done_at = time.perf_counter()
                self.done.set()

    def expect(self, events_each: int) -> None:
        self.target = events_each
        self.reached = sum(1 for r in self.readers if r.count >= events_each)
        self.done = asyncio.Event()
        if self.reached == self.clients:
            self.done.set()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.expect(1)  # Kurs: the snapshot; raw: "joined"
        for _ in range(self.clients):
            _, reader = await loop.create_connection(
                lambda: SseReader(self.port, self.path, self.on_event), "127.0.0.1", self.port
            )
            self.readers.append(reader)
        await asyncio.gather(*(r.opened for r in self.readers))
        await asyncio.wait_for(self.done.wait(), 60)

    async def throughput(self, events: int) -> float:
        from realtime import events as realtime_events

        self.expect(self.readers[0].count + events)
        started = time.perf_counter()
        for i in range(events):
            realtime_events.publish("rate.updated", bench_rate(i))
        try:
            await asyncio.wait_for(self.done.wait(), 120)
        except TimeoutError:
            raise SystemExit(f"bench: SSE on {self.port}{self.path} lost events") from None
        return self.clients * events / (self.done_at - started)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers.clear()


# Two seeded pairs to subscribe to, six more that the socket does not follow. Not BTC-USD: the
# full path's fetcher numbers its versions from 1, and the web drops a version it has seen.
RESUME_PAIRS = ("ETH-RUB", "USDTERC-USD")
RESUME_ALL = (*RESUME_PAIRS, *(f"R{i}-USD" for i in range(6)))
RESUME_MISSED = 100
RESUME_LIVE = 20


def resume_rate(pair: str) -> dict[str, Any]:
    """A `rate.updated` of a seeded pair with a version unique in this run: the event's name."""
    data = bench_rate(0)
    data["direction"] = pair
    return data


async def resume_rounds(port: int, rounds: int) -> dict[str, int]:
    """A socket on two of the eight pairs goes away, events are published across all eight,
    and it comes back with `?since=<the last seq it saw>` while more are published; it reads
    until a marker event published after the reconnection. Each event is told apart by its
    `version`: expected are those of its pairs published after it left."""
    import websockets

    from realtime import events as realtime_events

    base = f"ws://127.0.0.1:{port}/ws/items?pairs={','.join(RESUME_PAIRS)}"
    tally = dict.fromkeys(
        ("expected", "received", "duplicated", "missing", "out_of_order", "foreign", "gaps"), 0
    )
    seen: set[int] = set()
    last_seq: int | None = None

    def publish(pair: str, expected: set[int]) -> int:
        data = resume_rate(pair)
        realtime_events.publish("rate.updated", data)
        if pair in RESUME_PAIRS:
            expected.add(data["version"])
        return int(data["version"])

    async with websockets.connect(base) as socket:
        snapshot = json.loads(await socket.recv())
        last_seq = snapshot.get("seq")
    if last_seq is None:
        raise SystemExit("bench: the snapshot has no seq (JetStream off?): no resume to measure")
    for _ in range(rounds):
        expected: set[int] = set()
        for i in range(RESUME_MISSED):
            publish(RESUME_ALL[i % len(RESUME_ALL)], expected)
        received: set[int] = set()
        async with websockets.connect(f"{base}&since={last_seq}") as socket:
            # Live events while the replay runs: the hand-over must neither drop nor repeat.
            for i in range(RESUME_LIVE):
                publish(RESUME_ALL[i % len(RESUME_ALL)], expected)
                await asyncio.sleep(0.002)
            marker = publish(RESUME_PAIRS[0], expected)
            while marker not in received:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 30))
                if frame.get("type") == "gap":
                    tally["gaps"] += 1  # the replay failed: a snapshot replaces the events
                if frame.get("type") != "rate.updated":
                    continue
                seq, version = frame.get("seq"), frame["data"]["version"]
                if seq is None or seq <= last_seq:
                    tally["out_of_order"] += 1
                else:
                    last_seq = seq
                if frame["data"]["direction"] not in RESUME_PAIRS:
                    tally["foreign"] += 1
                if version in seen:
                    tally["duplicated"] += 1
                seen.add(version)
                received.add(version)
        tally["expected"] += len(expected)
        tally["received"] += len(received & expected)
        tally["missing"] += len(expected - received)
    return tally


def set_price(port: int, price: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_control/binance/price",
        data=json.dumps({"symbol": "BTCUSDT", "price": price}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux).

    On a machine other sessions share, wall-clock figures swing with their load; the CPU a
    server spends per delivery barely does, so it compares code within one run and across runs.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are the 14th and 15th fields; the 3rd is the first after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- orchestration ----------------------------------------------------------------------------
class Processes:
    def __init__(self, profile_dir: Path | None = None) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.profile_dir = profile_dir

    def start(
        self, args: list[str], env: dict[str, str], log: Path, *, profile: str = ""
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        self.started.append(process)
        if profile and self.profile_dir is not None:
            # py-spy attached for the process's whole life; stopped (SIGINT: it writes its
            # folded stacks) before the processes are.
            out = self.profile_dir / f"{profile}.txt"
            self.profilers.append(
                subprocess.Popen(
                    [
                        *(str(VENV_BIN / "py-spy"), "record", "-p", str(process.pid)),
                        *("-r", "500", "-f", "raw", "-o", str(out), "--nonblocking", "--threads"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return process

    def stop_all(self) -> None:
        for profiler in self.profilers:
            profiler.send_signal(signal.SIGINT)
        for profiler in self.profilers:
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
        for process in reversed(self.started):
            process.terminate()
        for process in self.started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


async def run(args: argparse.Namespace, workdir: Path, processes: Processes) -> None:
    nats_port, web_port, emulator_port, raw_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "kurs-bench-secret-key-not-for-production",
        "DATABASE_URL": args.database_url or f"sqlite:///{workdir / 'bench.sqlite3'}",
        "NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "REDIS_URL": REDIS_URL,
        "KURS_NATS_PREFIX": prefix,
        "KURS_WS_HEARTBEAT": "3600",
        "KURS_LOG_LEVEL": "WARNING",
        "KURS_RATE_LIMIT": "",  # 200 SSE clients from one address
        "KURS_MAX_CONNECTIONS_PER_CLIENT": "100000",  # 1,000 sockets from one address
    }
    os.environ.update(env)
    # JetStream on, as in production: the web process consumes through an ordered consumer and
    # every frame carries its stream sequence.
    processes.start(
        [
            str(VENV_BIN / "nats-server"),
            *("-a", "127.0.0.1", "-p", str(nats_port)),
            *(() if args.no_jetstream else ("-js", "-sd", str(workdir / "jetstream"))),
        ],
        env,
        workdir / "nats.log",
    )
    await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=REPO,
        env=env,
        check=True,
    )
    wait_for_port(nats_port, 30.0)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from channels.layers import get_channel_layer

    from realtime import nats as realtime_nats

    # Connected first, so that this process creates the stream before the web process consumes.
    if not await asyncio.to_thread(realtime_nats.wait_connected, 10):
        raise SystemExit("bench: cannot connect to the bench's nats-server")
    web = processes.start(
        [PYTHON, __file__, "--serve", str(web_port)],
        {**env, "KURS_INSTANCE": "bench-web"},
        workdir / "web.log",
        profile="web",
    )
    raw_sse_port = free_port()
    raw_server = processes.start(
        [PYTHON, __file__, "--raw-serve", str(raw_port), "--raw-sse", str(raw_sse_port)],
        env,
        workdir / "raw.log",
    )
    wait_for_port(web_port, 30.0)
    wait_for_port(raw_port, 30.0)
    wait_for_port(raw_sse_port, 30.0)
    layer = get_channel_layer()

    n, m = args.sockets, args.events
    kurs_rates: list[float] = []
    raw_rates: list[float] = []
    group_rates: list[float] = []
    latencies_runs: list[list[float]] = []
    # CPU seconds of each server per delivery, during the throughput runs: Kurs's, the raw's.
    kurs_cpu: list[float] = []
    raw_cpu: list[float] = []
    latency_cpu: list[float] = []  # the web process's CPU seconds per event to all N sockets
    seq_seen = False
    for run_index in range(args.repeat):
        kurs = Fanout(
            web_port, "/ws/items", n, policy_every=args.policy_every, policy_query=POLICY_QUERY
        )
        await kurs.connect(first_frames=1)  # the snapshot
        cpu = cpu_seconds(web.pid)
        kurs_rates.append(await publish_throughput(kurs, m))
        kurs_cpu.append((cpu_seconds(web.pid) - cpu) / (n * m))
        seq_seen = seq_seen or b'"seq":' in kurs.last_frame
        cpu = cpu_seconds(web.pid)
        latencies_runs.append(await kurs_latency(kurs, args.latency_events))
        latency_cpu.append((cpu_seconds(web.pid) - cpu) / args.latency_events)
        kurs.close()
        raw = Fanout(raw_port, "/", n)
        await raw.connect(first_frames=1)  # "joined"
        cpu = cpu_seconds(raw_server.pid)
        raw_rates.append(await publish_throughput(raw, m))
        raw_cpu.append((cpu_seconds(raw_server.pid) - cpu) / (n * m))
        raw.close()
        line = (
            f"  run {run_index + 1}: kurs {kurs_rates[-1]:,.0f}/s, raw {raw_rates[-1]:,.0f}/s "
            f"({kurs_rates[-1] / raw_rates[-1]:.2f}x), "
            f"latency median {statistics.median(latencies_runs[-1]) * 1000:.1f} ms, "
            f"p99 {percentile(latencies_runs[-1], 99) * 1000:.1f} ms"
        )
        if not args.skip_group_send:
            baseline = Fanout(web_port, "/ws/baseline", n)
            await baseline.connect(first_frames=1)  # "joined": in the group
            group_rates.append(await baseline_throughput(baseline, m, layer))
            baseline.close()
            line += f", group_send {group_rates[-1]:,.0f}/s"
        print(line, flush=True)

    kurs_rate = statistics.median(kurs_rates)
    raw_rate = statistics.median(raw_rates)
    medians = [statistics.median(run) * 1000 for run in latencies_runs]
    p99s = [percentile(run, 99) * 1000 for run in latencies_runs]
    policy = f"every {args.policy_every}th with {POLICY_QUERY}" if args.policy_every else "none"
    print(
        f"\nfan-out to {n} sockets, {m} rate.updated per run, median of {args.repeat} runs "
        f"(JetStream {'off' if args.no_jetstream else 'on'}, "
        f"frames carry seq: {'yes' if seq_seen else 'no'}; policies: {policy}):"
    )
    print(f"  kurs (NATS -> bridge -> hub)      {kurs_rate:>10,.0f} deliveries/s")
    print(f"  raw websockets broadcast          {raw_rate:>10,.0f} deliveries/s")
    print(f"  ratio kurs / raw                  {kurs_rate / raw_rate:>10.2f}x  (target >= 0.5x)")
    kurs_us, raw_us = statistics.median(kurs_cpu) * 1e6, statistics.median(raw_cpu) * 1e6
    if raw_us > 0:  # not in a run too short for the 10 ms clock
        print(
            f"  server CPU per delivery           kurs {kurs_us:.1f} us, raw {raw_us:.1f} us: "
            f"{kurs_us / raw_us:.2f}x (load-independent; the clock ticks at 10 ms)"
        )
    if group_rates:
        group_rate = statistics.median(group_rates)
        print(f"  Channels group_send               {group_rate:>10,.0f} deliveries/s")
        print(f"  ratio kurs / group_send           {kurs_rate / group_rate:>10.1f}x")
    print(
        f"publish -> all {n} sockets have the event, {args.latency_events} events per run "
        f"(each run's median and p99; the median of {args.repeat} runs):"
    )
    print(
        "  runs: "
        + ", ".join(f"median {a:.1f} / p99 {b:.1f} ms" for a, b in zip(medians, p99s, strict=True))
    )
    p99 = statistics.median(p99s)
    print(
        f"  median {statistics.median(medians):.1f} ms, p99 {p99:.1f} ms"
        f"  (target p99 < 50 ms: {'met' if p99 < 50 else 'NOT met'})",
        flush=True,
    )
    print(f"  web process CPU per event         {statistics.median(latency_cpu) * 1000:.1f} ms")

    if args.resume_rounds:
        tally = await resume_rounds(web_port, args.resume_rounds)
        print(
            f"resume: {args.resume_rounds} disconnect/reconnect rounds of a socket on "
            f"{','.join(RESUME_PAIRS)} (?since=<last seq>), {RESUME_MISSED} events across "
            f"{len(RESUME_ALL)} pairs while away, {RESUME_LIVE} more during each reconnection:"
        )
        print(
            "  events expected {expected}, received {received}, duplicated {duplicated}, "
            "missing {missing}, out of order {out_of_order}, other pairs {foreign}, "
            "gap frames {gaps}".format(**tally),
            flush=True,
        )

    if not args.skip_sse:
        # After the WebSocket figures: the streaming readers load this process's loop too.
        sse_rates, raw_sse_rates = [], []
        for _ in range(args.repeat):
            kurs_sse = SseClients(web_port, "/api/v1/stream", args.sse_clients)
            await kurs_sse.connect()
            sse_rates.append(await kurs_sse.throughput(args.sse_events))
            kurs_sse.close()
            raw_sse = SseClients(raw_sse_port, "/", args.sse_clients)
            await raw_sse.connect()
            raw_sse_rates.append(await raw_sse.throughput(args.sse_events))
            raw_sse.close()
        sse_rate, raw_sse_rate = statistics.median(sse_rates), statistics.median(raw_sse_rates)
        print(
            f"SSE to {args.sse_clients} curl-like readers, {args.sse_events} rate.updated per "
            f"run, median of {args.repeat} runs:"
        )
        print(
            "  runs: "
            + ", ".join(
                f"{a:,.0f} vs {b:,.0f}/s" for a, b in zip(sse_rates, raw_sse_rates, strict=True)
            )
        )
        print(f"  kurs /api/v1/stream               {sse_rate:>10,.0f} deliveries/s")
        print(f"  raw asyncio SSE broadcast         {raw_sse_rate:>10,.0f} deliveries/s")
        print(f"  ratio kurs / raw                  {sse_rate / raw_sse_rate:>10.2f}x", flush=True)

    if args.skip_full_path:
        return
    processes.start(
        [PYTHON, "manage.py", "run_emulator", "--port", str(emulator_port), "--tick", "3600"],
        env,
        workdir / "emulator.log",
    )
    wait_for_port(emulator_port, 30.0)
    emulator = f"http://127.0.0.1:{emulator_port}/binance"
    fetcher = processes.start(
        [PYTHON, "manage.py", "run_fetch", "--watch", "--provider", "binance"],
        {
            **env,
            "KURS_INSTANCE": "bench-fetcher",
            "KURS_PROVIDERS": "binance",
            "KURS_BINANCE_REST_URL": emulator,
            "KURS_BINANCE_WS_URL": f"ws://127.0.0.1:{emulator_port}/binance",
        },
        workdir / "fetcher.log",
        profile="fetcher",
    )
    full, bare = [], []
    bus_part: list[float] = []
    bare_part: list[float] = []
    fetcher_cpu: list[float] = []
    for run in range(args.repeat):
        async with bare_beside(emulator_port) as beside:
            cpu = cpu_seconds(fetcher.pid)
            full.append(
                await full_path_latency(
                    web_port, emulator_port, args.full_path_ticks, bus_part, beside, bare_part
                )
            )
            # Per tick, with what the fetcher does between ticks (little: it waits on the stream).
            fetcher_cpu.append((cpu_seconds(fetcher.pid) - cpu) / (args.full_path_ticks + 3))
        start = Decimal(95000 + 1000 * run)
        bare.append(await bare_stream_latency(emulator_port, args.full_path_ticks, start))
    full_p50 = statistics.median(statistics.median(r) for r in full) * 1000
    full_p99 = statistics.median(percentile(r, 99) for r in full) * 1000
    bare_p50 = statistics.median(statistics.median(r) for r in bare) * 1000
    bare_p99 = statistics.median(percentile(r, 99) for r in bare) * 1000
    print(
        "emulator stream tick -> fetcher -> NATS -> web -> socket, "
        f"{args.full_path_ticks} ticks per run, median of {args.repeat} runs:"
    )
    print(f"  kurs                              median {full_p50:.1f} ms, p99 {full_p99:.1f} ms")
    if bus_part:
        print(
            "    of which tick -> on NATS        median "
            f"{statistics.median(bus_part) * 1000:.1f} ms (the fetcher's share)"
        )
    print(
        "    fetcher CPU per tick            "
        f"{statistics.median(fetcher_cpu) * 1000:.2f} ms (load-independent; 10 ms clock ticks)"
    )
    print(f"  baseline (bare client on stream)  median {bare_p50:.1f} ms, p99 {bare_p99:.1f} ms")
    print(
        f"  ratio                             {full_p50 / bare_p50:.1f}x median "
        f"(target <= 3x), {full_p99 / bare_p99:.1f}x p99"
    )
    if bare_part:
        # The same ticks, at the same moment: every process the tick wakes shares 2 cores.
        beside_p50 = statistics.median(bare_part) * 1000
        print(
            f"  bare client beside, same ticks    median {beside_p50:.1f} ms "
            f"(its own process, connected while Kurs was measured): "
            f"kurs {full_p50 / beside_p50:.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50, help="events per throughput run")
    parser.add_argument("--latency-events", type=int, default=100)
    parser.add_argument("--full-path-ticks", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-full-path", action="store_true")
    parser.add_argument("--raw-serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--policy-every", type=int, default=10, help="every Nth Kurs socket has a policy (0: none)"
    )
    parser.add_argument("--skip-group-send", action="store_true", help="the slowest baseline")
    parser.add_argument(
        "--no-jetstream", action="store_true", help="plain NATS (frames without seq), to compare"
    )
    parser.add_argument(
        "--database-url",
        help="the fetcher's and web's database (default: a fresh SQLite file; a PostgreSQL "
        "database, as in production, is migrated and written to)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the web process and the fetcher (folded stacks: DIR/web.txt, fetcher.txt)",
    )
    parser.add_argument(
        "--resume-rounds", type=int, default=20, help="disconnect/reconnect rounds (0: none)"
    )
    parser.add_argument("--raw-sse", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare-listen", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--sse-clients", type=int, default=200)
    parser.add_argument("--sse-events", type=int, default=50, help="events per SSE run")
    parser.add_argument("--skip-sse", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.raw_serve:
        raw_serve(args.raw_serve, args.raw_sse)
        return
    if args.bare_listen:
        bare_listen(args.bare_listen)
        return
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        raise SystemExit("bench: the baseline needs Redis on 127.0.0.1:6379") from None
    profile_dir = None
    if args.profile:
        profile_dir = Path(args.profile).resolve()
        profile_dir.mkdir(parents=True, exist_ok=True)
    processes = Processes(profile_dir)
    # Other processes share the cores: the wall-clock rows follow their load, so it is printed.
    print(f"cores: {os.cpu_count()}; load average {load_average()} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="kurs-bench-") as workdir:
        try:
            asyncio.run(run(args, Path(workdir), processes))
        finally:
            from realtime import nats as realtime_nats

            realtime_nats.shutdown()
            processes.stop_all()
            print(f"load average {load_average()} at end")


def load_average() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
