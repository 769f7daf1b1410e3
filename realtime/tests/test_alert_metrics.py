"""The realtime metrics that alerts read (docs/operations.md#alerts), against real NATS servers:
`kurs_nats_disconnected` follows the connection, `kurs_bridge_event_lag_seconds` measures how
long a stored event waited before this process's bridge handled it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from prometheus_client import REGISTRY

from items.models import Item
from realtime import events
from realtime import nats as realtime_nats
from realtime.nats import connection
from realtime.tests.conftest import connect, receive, receive_until
from tests.services import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True)]


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


async def wait_for(flag: threading.Event, wait: float = 10.0) -> bool:
    return await asyncio.to_thread(flag.wait, wait)


async def test_nats_disconnected_is_one_only_while_a_started_connection_is_cut_off(
    own_nats: NatsServer,
) -> None:
    assert sample("kurs_nats_disconnected") == 0  # not started: nothing is cut off
    await sync_to_async(Item.objects.get_or_create)(base="BTC", quote="USD")
    ws = await connect("/ws/items?pairs=BTC-USD")
    await receive(ws)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 10.0)
    assert sample("kurs_nats_disconnected") == 0

    await asyncio.to_thread(own_nats.stop)
    assert await wait_for(connection.disconnected)
    assert sample("kurs_nats_disconnected") == 1

    await asyncio.to_thread(own_nats.start)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15.0)
    assert sample("kurs_nats_disconnected") == 0
    await ws.disconnect()

    await asyncio.to_thread(own_nats.stop)
    assert await wait_for(connection.disconnected)
    await asyncio.to_thread(connection.shutdown)
    assert sample("kurs_nats_disconnected") == 0  # stopped on purpose: no alert


async def test_the_bridge_measures_how_long_a_stored_event_waited(machine_nats: str) -> None:
    await sync_to_async(Item.objects.get_or_create)(base="ETH", quote="USD")
    ws = await connect("/ws/items?pairs=ETH-USD")
    await receive(ws)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 10.0)

    def publish(value: str) -> None:
        events.publish(
            "rate.updated",
            {
                "direction": "ETH-USD",
                "value": Decimal(value),
                "provider": "binance",
                "source_time": "2026-11-23T06:00:00Z",
                "derived": False,
            },
        )

    count = sample("kurs_bridge_event_lag_seconds_count")
    total = sample("kurs_bridge_event_lag_seconds_sum")
    publish("1")
    assert (await receive_until(ws, "rate.updated", wait=5))["data"]["value"] == 1
    assert sample("kurs_bridge_event_lag_seconds_count") == count + 1
    quick = sample("kurs_bridge_event_lag_seconds_sum") - total
    assert quick >= 0  # how small is the load of the machine (bench/bench_realtime.py: latency)

    # A loop too busy to run the bridge: the event is stored at once and waits for the loop.
    publish("2")
    time.sleep(0.5)  # noqa: ASYNC251 - blocking this loop (the bridge's) is the point
    assert (await receive_until(ws, "rate.updated", wait=5))["data"]["value"] == 2
    assert sample("kurs_bridge_event_lag_seconds_count") == count + 2
    slow = sample("kurs_bridge_event_lag_seconds_sum") - total - quick
    assert slow > 0.3  # the loop was blocked 0.5 s after the event was stored
    await ws.disconnect()
