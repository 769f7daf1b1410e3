"""`GET /api/v1/stream` over real HTTP (uvicorn in this process): Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import LazySettings
from prometheus_client import REGISTRY

from items.models import Item
from realtime import events
from realtime.bridge import bridge
from realtime.hub import hub
from realtime.nats import connection

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class SseEvent:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict[str, Any]:
        return json.loads("\n".join(self.data))


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """The stream's events as the SSE spec splits them (a blank line ends one)."""
    current = SseEvent()
    async for line in response.aiter_lines():
        if line == "":
            yield current
            current = SseEvent()
        elif line.startswith(":"):
            current.comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                current.data.append(value)
            elif name in ("id", "event"):
                setattr(current, name, value)


async def next_event(stream: AsyncIterator[SseEvent], kind: str, wait: float = 5.0) -> SseEvent:
    async with asyncio.timeout(wait):
        async for event in stream:
            if event.event == kind:
                return event
    raise AssertionError(f"the stream ended before a {kind} event")


def rate(direction: str, value: int) -> dict[str, object]:
    return {
        "direction": direction,
        "value": Decimal(value),
        "provider": "binance",
        "source_time": "2026-11-23T06:00:00Z",
        "status": "live",
        "derived": False,
    }


@pytest.fixture
async def pairs() -> None:
    for base, quote in (("BTC", "USD"), ("ETH", "RUB")):
        await sync_to_async(Item.objects.get_or_create)(base=base, quote=quote)


@pytest.fixture
async def client(asgi_server: int) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{asgi_server}", timeout=httpx.Timeout(10.0)
    ) as http:
        yield http


async def wait_for_subscribers(count: int, wait: float = 5.0) -> None:
    async with asyncio.timeout(wait):
        while len(hub) != count:  # noqa: ASYNC110 - the hub has no event for this; bounded
            await asyncio.sleep(0.01)


async def test_it_streams_the_snapshot_then_live_events_as_sse(
    pairs: None, client: httpx.AsyncClient
) -> None:
    async with client.stream("GET", "/api/v1/stream?pairs=btc-usd") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        stream = sse_events(response)
        first = await anext(stream)
        assert first.event is None  # the `retry:` advice for EventSource
        snapshot = await next_event(stream, "snapshot")
        assert snapshot.json["data"]["pairs"] == ["BTC-USD"]
        events.publish("rate.updated", rate("ETH-RUB", 1))  # another pair: not for this one
        events.publish("rate.updated", rate("BTC-USD", 2))
        update = await next_event(stream, "rate.updated")
        assert update.json["data"]["direction"] == "BTC-USD"
        assert update.json["data"]["value"] == 2


async def test_it_sends_a_keep_alive_comment_every_heartbeat(
    pairs: None, client: httpx.AsyncClient, settings: LazySettings
) -> None:
    settings.KURS_WS_HEARTBEAT = 0.2
    loop = asyncio.get_running_loop()
    async with client.stream("GET", "/api/v1/stream") as response:
        stream = sse_events(response)
        await next_event(stream, "snapshot")
        started = loop.time()
        beats = 0
        # Three beats of 0.2 s, never sooner; waited for generously (a loaded machine), yet far
        # inside the one beat the default (KURS_WS_HEARTBEAT, 30 s) would give.
        async with asyncio.timeout(20):
            async for event in stream:
                beats += event.comments.count("keep-alive")
                if beats == 3:
                    break
        assert loop.time() - started >= 0.3


async def test_a_disconnect_frees_the_subscription(pairs: None, client: httpx.AsyncClient) -> None:
    baseline = len(hub)

    def open_streams() -> float | None:
        return REGISTRY.get_sample_value("kurs_sse_connections")

    gauge = open_streams() or 0.0
    for _ in range(3):
        async with client.stream("GET", "/api/v1/stream") as response:
            await next_event(sse_events(response), "snapshot")
            assert len(hub) == baseline + 1
            assert open_streams() == gauge + 1
        await wait_for_subscribers(baseline)
    assert len(hub) == baseline
    assert open_streams() == gauge


async def test_clients_leaving_while_events_flow_free_every_subscription(
    pairs: None, client: httpx.AsyncClient
) -> None:
    """A client that goes away just as an event arrives is still let go (the body used
    `asyncio.wait_for`, which on Python 3.11 can swallow that cancellation: the body then
    streamed to nobody forever)."""
    baseline = len(hub)
    flowing = True

    async def publish() -> None:
        for value in itertools.count(1):
            if not flowing:
                return
            events.publish("rate.updated", rate("BTC-USD", value))
            await asyncio.sleep(0.001)

    async def visit() -> None:
        async with client.stream("GET", "/api/v1/stream") as response:
            await next_event(sse_events(response), "rate.updated")

    publisher = asyncio.create_task(publish())
    try:
        for _ in range(4):
            await asyncio.gather(*(visit() for _ in range(20)))
    finally:
        flowing = False
        await publisher
    await wait_for_subscribers(baseline)


@pytest.mark.parametrize(
    ("query", "headers", "detail"),
    [
        ("pairs=NOPE-XYZ", {}, "pairs: unknown pair(s): NOPE-XYZ"),
        ("min_change=2", {}, None),
        ("min_interval_ms=-1", {}, None),
        ("since=-3", {}, None),
        ("since=3&epoch=Not-An-Epoch", {}, None),
        ("since=3&epoch=" + "a" * 17, {}, None),
        ("", {"Last-Event-ID": "yesterday"}, None),
    ],
)
async def test_bad_input_is_a_422_with_json(
    pairs: None, client: httpx.AsyncClient, query: str, headers: dict[str, str], detail: str | None
) -> None:
    answer = await client.get(f"/api/v1/stream?{query}", headers=headers)
    assert answer.status_code == 422
    body = answer.json()
    assert "detail" in body
    if detail is not None:
        assert body["detail"] == detail


async def test_empty_parameters_mean_absent(pairs: None, client: httpx.AsyncClient) -> None:
    path = "/api/v1/stream?pairs=&since=&epoch=&min_interval_ms=&min_change="
    async with client.stream("GET", path) as response:
        assert response.status_code == 200
        snapshot = await next_event(sse_events(response), "snapshot")
        assert snapshot.json["data"]["pairs"] is None


async def test_the_openapi_document_describes_the_stream(client: httpx.AsyncClient) -> None:
    document = (await client.get("/api/v1/openapi.json")).json()
    operation = document["paths"]["/api/v1/stream"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert "Last-Event-ID" in operation["description"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"pairs", "since", "epoch", "min_interval_ms", "min_change", "Last-Event-ID"} <= names


@pytest.mark.nats
async def test_ids_are_stream_sequences_and_last_event_id_resumes(
    machine_nats: str, pairs: None, client: httpx.AsyncClient
) -> None:
    await bridge.ensure_started()
    assert await asyncio.to_thread(connection.connected.wait, 10)
    async with client.stream("GET", "/api/v1/stream?pairs=BTC-USD") as response:
        stream = sse_events(response)
        snapshot = await next_event(stream, "snapshot")
        assert snapshot.id is not None
        events.publish("rate.updated", rate("BTC-USD", 1))
        first = await next_event(stream, "rate.updated")
        assert first.id is not None
        assert int(first.id) > int(snapshot.id)
        assert first.json["seq"] == int(first.id)
    for value in range(2, 22):  # missed while away
        events.publish("rate.updated", rate("BTC-USD" if value % 2 else "ETH-RUB", value))
    events.publish("provider.state", {"name": "marker", "state": "closed", "reason": ""})
    headers = {"Last-Event-ID": first.id}
    async with client.stream("GET", "/api/v1/stream?pairs=BTC-USD", headers=headers) as response:
        got = []
        async with asyncio.timeout(10):
            async for event in sse_events(response):
                if event.event == "rate.updated":
                    got.append(event)
                elif event.event == "provider.state":
                    break
                else:
                    assert event.event is None  # retry advice, keep-alives; no snapshot
    assert [e.json["data"]["value"] for e in got] == list(range(3, 22, 2))
    ids = [int(e.id or 0) for e in got]
    assert ids == sorted(set(ids))
    assert ids[0] > int(first.id)


async def test_curl_can_follow_it(pairs: None, asgi_server: int) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    process = await asyncio.create_subprocess_exec(
        curl,
        "-sN",
        f"http://127.0.0.1:{asgi_server}/api/v1/stream?pairs=BTC-USD",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(10):
            while (await process.stdout.readline()).strip() != b"event: snapshot":
                pass
            events.publish("rate.updated", rate("BTC-USD", 5))
            while not (line := await process.stdout.readline()).startswith(b"data: "):
                pass
            while not (line := await process.stdout.readline()).startswith(b"data: "):
                pass
        assert json.loads(line.removeprefix(b"data: "))["data"]["value"] == 5
    finally:
        process.kill()
        with contextlib.suppress(ProcessLookupError):
            await process.wait()
    await wait_for_subscribers(0)


def gauge(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


async def test_open_streams_and_sockets_are_counted_in_metrics(
    pairs: None, client: httpx.AsyncClient, asgi_server: int
) -> None:
    from websockets.asyncio.client import connect as ws_connect

    baseline = len(hub)
    before = (await client.get("/metrics")).text
    sse_before = gauge(before, "kurs_sse_connections")
    ws_before = gauge(before, "kurs_ws_connections")
    async with client.stream("GET", "/api/v1/stream") as response:
        # Kept: a reader collected mid-stream would close the response.
        stream = sse_events(response)
        await next_event(stream, "snapshot")
        async with ws_connect(f"ws://127.0.0.1:{asgi_server}/ws/items") as ws:
            assert json.loads(await ws.recv())["type"] == "snapshot"
            during = (await client.get("/metrics")).text
            assert gauge(during, "kurs_sse_connections") == sse_before + 1
            assert gauge(during, "kurs_ws_connections") == ws_before + 1
    # Each leaves the hub and its gauge in one step (no await between): once both are out of
    # the hub, both gauges are back.
    await wait_for_subscribers(baseline)
    after = (await client.get("/metrics")).text
    assert gauge(after, "kurs_sse_connections") == sse_before
    assert gauge(after, "kurs_ws_connections") == ws_before
