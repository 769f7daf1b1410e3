"""Per-client caps and the replay bound (realtime/limits.py, realtime/resume.py), over real HTTP
and WebSocket connections to uvicorn in this process, with the machine's NATS JetStream where a
stream is replayed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest
from asgiref.sync import sync_to_async
from django.conf import LazySettings
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from items.models import Item
from realtime import events
from realtime.bridge import bridge
from realtime.limits import caps
from realtime.nats import connection, stream_consumer
from realtime.tests.conftest import connect, receive, receive_until, serving
from realtime.tests.test_resume import publish_marker, rate, until_marker
from realtime.tests.test_sse import next_event, sse_events

pytestmark = pytest.mark.django_db(transaction=True)

ME = "127.0.0.1"


@pytest.fixture
async def pairs() -> None:
    for base, quote in (("BTC", "USD"), ("ETH", "RUB")):
        await sync_to_async(Item.objects.get_or_create)(base=base, quote=quote)


@pytest.fixture
async def asgi_server() -> AsyncIterator[int]:
    """As the conftest's, but as scripts/serve.sh runs uvicorn: --no-proxy-headers (uvicorn would
    otherwise take X-Forwarded-For from 127.0.0.1 as the client's address itself)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    async with serving(listener, proxy_headers=False) as port:
        yield port


@pytest.fixture
async def client(asgi_server: int) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{asgi_server}"
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as http:
        yield http


async def until_count(counter: Counter[str], count: int, wait: float = 5.0) -> None:
    """The server (this process) has taken or given back slots until `count` remain."""
    async with asyncio.timeout(wait):
        while counter[ME] != count:  # noqa: ASYNC110 - slots have no event; bounded
            await asyncio.sleep(0.01)


async def first_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        return json.loads(await ws.recv())


async def refused_socket(url: str) -> tuple[dict[str, Any], int, str]:
    """A handshake the server accepts then closes: its one frame and its close code, reason."""
    async with ws_connect(url) as ws:
        frame = await first_json(ws)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                await ws.recv()
    assert closed.value.rcvd is not None
    return frame, closed.value.rcvd.code, closed.value.rcvd.reason


def assert_429(answer: httpx.Response, detail: str, retry_after: str) -> None:
    assert answer.status_code == 429
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["retry-after"] == retry_after
    assert answer.json() == {"detail": detail}


# --- connections per client -----------------------------------------------------------------
async def test_connections_past_the_cap_are_refused_on_both_doors_until_one_closes(
    pairs: None, client: httpx.AsyncClient, asgi_server: int, settings: LazySettings
) -> None:
    settings.KURS_MAX_CONNECTIONS_PER_CLIENT = 3
    url = f"ws://127.0.0.1:{asgi_server}/ws/items"
    detail = "too many connections from this address (at most 3 per server process)"
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(client.stream("GET", "/api/v1/stream"))
        # Each reader kept: one left to the collector closes its response, and the stream.
        readers = [sse_events(first)]
        await next_event(readers[0], "snapshot")
        second = await stack.enter_async_context(client.stream("GET", "/api/v1/stream"))
        readers.append(sse_events(second))
        await next_event(readers[1], "snapshot")
        socket = await stack.enter_async_context(ws_connect(url))
        assert (await first_json(socket))["type"] == "snapshot"
        assert caps.connections[ME] == 3

        assert_429(await client.get("/api/v1/stream"), detail, "10")
        frame, code, reason = await refused_socket(url)
        assert (frame, code, reason) == ({"type": "error", "detail": detail}, 1008, detail)
        # Other requests are not connections: they still pass.
        assert (await client.get("/api/v1/health")).status_code == 200

        await first.aclose()
        await until_count(caps.connections, 2)
        async with ws_connect(url) as again:
            assert (await first_json(again))["type"] == "snapshot"
    await until_count(caps.connections, 0)


async def test_the_client_is_the_address_the_rate_limits_see(
    pairs: None,
    client: httpx.AsyncClient,
    asgi_server: int,
    settings: LazySettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KURS_NUM_PROXIES=0: X-Forwarded-For is the client's word and buys no new slot; behind one
    proxy, its last entry tells the proxy's clients apart."""
    settings.KURS_MAX_CONNECTIONS_PER_CLIENT = 1
    url = f"ws://127.0.0.1:{asgi_server}/ws/items"
    async with ws_connect(url) as held:
        assert (await first_json(held))["type"] == "snapshot"
        forged = {"X-Forwarded-For": "10.0.0.7"}
        assert (await client.get("/api/v1/stream", headers=forged)).status_code == 429
        _, code, _ = await refused_socket(f"{url}?pairs=BTC-USD")
        assert code == 1008

        settings.NINJA_NUM_PROXIES = 1  # KURS_NUM_PROXIES
        async with client.stream("GET", "/api/v1/stream", headers=forged) as proxied:
            assert proxied.status_code == 200
            reader = sse_events(proxied)
            await next_event(reader, "snapshot")
            assert caps.connections["10.0.0.7"] == 1
            headers = [("X-Forwarded-For", "10.0.0.8")]
            async with ws_connect(url, additional_headers=headers) as other:
                assert (await first_json(other))["type"] == "snapshot"
                assert caps.connections["10.0.0.8"] == 1
    await until_count(caps.connections, 0)
    assert not caps.connections


async def test_no_slot_is_kept_after_clients_come_and_go_in_every_way(
    pairs: None, client: httpx.AsyncClient, asgi_server: int, settings: LazySettings
) -> None:
    """Streams and sockets closed in every way give every slot back (a leak would lock a
    client out for the life of the process)."""
    settings.KURS_MAX_CONNECTIONS_PER_CLIENT = 4
    url = f"ws://127.0.0.1:{asgi_server}/ws/items"

    async def sse_visit() -> None:
        async with client.stream("GET", "/api/v1/stream") as response:
            await next_event(sse_events(response), "snapshot")

    async def sse_hang_up() -> None:
        # Gone before reading anything: the body may never have started.
        async with client.stream("GET", "/api/v1/stream"):
            pass

    async def ws_visit() -> None:
        async with ws_connect(url) as ws:
            await first_json(ws)

    for _ in range(5):
        await asyncio.gather(sse_visit(), sse_hang_up(), ws_visit(), ws_visit())
        await until_count(caps.connections, 0)
    async with client.stream("GET", "/api/v1/stream") as response:
        assert response.status_code == 200


# --- the replay bound -----------------------------------------------------------------------
async def started() -> None:
    await bridge.ensure_started()
    assert await asyncio.to_thread(connection.connected.wait, 10)
    assert stream_consumer.consuming_stream


async def publish_and_observe(count: int, marker: str) -> int:
    """`count` BTC-USD updates (values 1..count) and a marker, seen by this process: its seq."""
    observer = await connect("/ws/items?pairs=BTC-USD")
    await receive(observer)
    for value in range(1, count + 1):
        events.publish("rate.updated", rate("BTC-USD", value))
    publish_marker(marker)
    frames = await until_marker(observer, marker)
    await observer.disconnect()
    return int(frames[-1]["seq"])


@pytest.mark.nats
async def test_a_resume_within_the_bound_replays_and_one_beyond_gets_a_gap_and_a_snapshot(
    machine_nats: str, pairs: None, settings: LazySettings
) -> None:
    settings.KURS_MAX_REPLAY_EVENTS = 10
    await started()
    last = await publish_and_observe(30, "filled")

    within = await connect(f"/ws/items?pairs=BTC-USD&since={last - 10}")
    frames = await until_marker(within, "filled")
    assert [f["seq"] for f in frames] == list(range(last - 9, last + 1))
    assert [f["data"]["value"] for f in frames[:-1]] == list(range(22, 31))
    await within.disconnect()

    beyond = await connect(f"/ws/items?pairs=BTC-USD&since={last - 11}")
    gap = await receive(beyond)
    assert (gap["type"], gap["data"]) == ("gap", {"since": last - 11, "first_available": last - 9})
    snapshot = await receive(beyond)
    assert snapshot["type"] == "snapshot"
    assert (snapshot["seq"], [c["value"] for c in snapshot["data"]["courses"]]) == (last, [30])
    events.publish("rate.updated", rate("BTC-USD", 31))
    live = await receive_until(beyond, "rate.updated")
    assert (live["data"]["value"], live["seq"]) == (31, last + 1)
    await beyond.disconnect()


@pytest.mark.nats
async def test_sse_bounds_a_last_event_id_resume_alike(
    machine_nats: str, pairs: None, client: httpx.AsyncClient, settings: LazySettings
) -> None:
    settings.KURS_MAX_REPLAY_EVENTS = 10
    await started()
    last = await publish_and_observe(30, "filled")
    headers = {"Last-Event-ID": "1"}
    async with client.stream("GET", "/api/v1/stream?pairs=BTC-USD", headers=headers) as response:
        stream = sse_events(response)
        gap = await next_event(stream, "gap")
        assert gap.json["data"] == {"since": 1, "first_available": last - 9}
        snapshot = await next_event(stream, "snapshot")
        assert (snapshot.id, snapshot.json["data"]["courses"][0]["value"]) == (str(last), 30)
    async with client.stream("GET", f"/api/v1/stream?since={last - 2}") as response:
        stream = sse_events(response)
        first = await anext(stream)
        assert first.event is None  # the retry advice
        replayed = await anext(stream)
        assert (replayed.event, replayed.id) == ("rate.updated", str(last - 1))
    await until_count(caps.replays, 0)


# --- replays at once per client -------------------------------------------------------------
async def fill_with_big_events(url: str, prefix: str, count: int) -> None:
    """`count` foreign 60 KB messages in the stream: a replay of them that nobody reads stays
    blocked on the socket (megabytes, far over the kernel's buffers) and keeps its slot."""
    bus = await nats.connect(url)
    js = bus.jetstream()
    payload = json.dumps({"pad": "x" * 60_000}).encode()
    for _ in range(count):
        await js.publish(f"{prefix}.rates.BIG", payload)
    await bus.close()


@pytest.mark.nats
async def test_resumes_past_the_replays_at_once_are_refused_until_one_ends(
    machine_nats: str,
    prefix: str,
    pairs: None,
    client: httpx.AsyncClient,
    asgi_server: int,
    settings: LazySettings,
) -> None:
    settings.KURS_MAX_REPLAYS_PER_CLIENT = 1
    await started()
    since = await publish_and_observe(1, "start")
    await fill_with_big_events(machine_nats, prefix, 200)
    await publish_and_observe(1, "filled")
    detail = "too many resumes at once from this address (at most 1 per server process)"
    path = f"/api/v1/stream?since={since}"
    url = f"ws://127.0.0.1:{asgi_server}/ws/items?since={since}"
    async with client.stream("GET", path) as stuck:
        assert stuck.status_code == 200
        assert caps.replays[ME] == 1

        assert_429(await client.get(path), detail, "1")
        assert_429(await client.get("/api/v1/stream", headers={"Last-Event-ID": "1"}), detail, "1")
        frame, code, reason = await refused_socket(url)
        assert (frame, code, reason) == ({"type": "error", "detail": detail}, 1013, detail)
        # A connection that does not replay is not a replay.
        async with client.stream("GET", "/api/v1/stream") as fresh:
            reader = sse_events(fresh)
            await next_event(reader, "snapshot")
    await until_count(caps.replays, 0)
    async with ws_connect(url, max_size=None) as resumed:
        replayed = await first_json(resumed)
        assert (replayed["type"], replayed["seq"]) == ("nats.inbound", since + 1)
    await until_count(caps.replays, 0)
    await until_count(caps.connections, 0)
