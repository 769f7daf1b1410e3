"""Two web processes (uvicorn subprocesses): every socket gets every event exactly once.

With NATS up, each process's bridge holds one plain subscription; with NATS down, producers fall
back to the channel-layer group that each bridge joined (channels-redis on the machine's Redis).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable

import pytest
from django.conf import LazySettings
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Origin

from realtime import events
from realtime import nats as realtime_nats
from realtime.nats import connection
from realtime.tests.conftest import REDIS_TEST_URL, WEB_TEST_TIMEOUT, WebProcess
from tests.services import NatsServer, require

pytestmark = [pytest.mark.nats, pytest.mark.redis, pytest.mark.timeout(WEB_TEST_TIMEOUT)]

EVENTS = 100
SOCKETS_PER_PROCESS = 2


async def open_sockets(webs: list[WebProcess]) -> list[ClientConnection]:
    sockets = []
    for web in webs:
        for _ in range(SOCKETS_PER_PROCESS):
            ws = await ws_connect(web.ws_url, origin=Origin(web.origin))
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["type"] == "snapshot"
            sockets.append(ws)
    return sockets


async def received_ids(ws: ClientConnection, marker_id: str) -> Counter[str]:
    """Every event id up to the marker, which goes last over the same path as the others."""
    seen: Counter[str] = Counter()
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if "id" in message:
            seen[message["id"]] += 1
        if message.get("id") == marker_id:
            return seen


def publish_batch() -> tuple[set[str], str]:
    ids = set()
    for i in range(EVENTS):
        envelope = events.publish(
            "fetch.completed", {"stored": i, "providers": {"binance": "ok"}, "duration_ms": i}
        )
        ids.add(envelope["id"])
    marker = events.publish("provider.state", {"name": "marker", "state": "closed", "reason": ""})
    return ids, marker["id"]


async def assert_exactly_once(sockets: list[ClientConnection]) -> None:
    ids, marker_id = await asyncio.to_thread(publish_batch)
    counts = await asyncio.gather(*(received_ids(ws, marker_id) for ws in sockets))
    for seen in counts:
        assert set(seen) == ids | {marker_id}
        assert max(seen.values()) == 1, "an event arrived twice on one socket"


async def close_all(sockets: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets))


async def test_each_socket_gets_each_event_once_with_nats_up(
    own_nats: NatsServer, web_processes: Callable[..., list[WebProcess]]
) -> None:
    webs = web_processes(2, nats_url=own_nats.url)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 10)
    sockets = await open_sockets(webs)
    try:
        await assert_exactly_once(sockets)
        assert realtime_nats.status()["fallback"] == 0
    finally:
        await close_all(sockets)


async def test_each_socket_gets_each_event_once_with_nats_down(
    own_nats: NatsServer,
    web_processes: Callable[..., list[WebProcess]],
    settings: LazySettings,
) -> None:
    require("Redis", "127.0.0.1", 6379)
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_TEST_URL], "prefix": "kurs"},
        }
    }
    webs = web_processes(2, nats_url=own_nats.url, redis_url=REDIS_TEST_URL)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 10)
    sockets = await open_sockets(webs)
    try:
        await asyncio.to_thread(own_nats.stop)
        assert await asyncio.to_thread(connection.disconnected.wait, 10)
        await assert_exactly_once(sockets)
        status = realtime_nats.status()
        assert status["status"] == "degraded"
        assert status["fallback"] == EVENTS + 1
    finally:
        await close_all(sockets)


async def test_a_started_web_process_keeps_the_collector_off_its_loop(asgi_server: int) -> None:
    # The lifespan freezes what start-up loaded and collects the young generation less often
    # (bridge.GC_THRESHOLD_0): the fan-out's p99 was the collector's pauses.
    import gc

    from realtime.bridge import GC_THRESHOLD_0

    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GC_THRESHOLD_0
