"""`/ws/items` over Channels' WebsocketCommunicator: every message kind and every bad input.

NATS is unreachable here (see conftest), so `events.publish` takes the fallback path to this
process's bridge: the same bridge -> hub -> socket path that NATS messages take.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import LazySettings

from items.models import Item
from rates.snapshot import snapshot
from rates.tests.support import store_current
from realtime import events
from realtime.bridge import bridge
from realtime.tests.conftest import connect, receive, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


def make_items(*codes: str) -> None:
    for code in codes:
        base, quote = code.split("-")
        Item.objects.get_or_create(base=base, quote=quote)


def rate_event(direction: str, value: str, provider: str = "binance") -> dict[str, object]:
    return {
        "direction": direction,
        "value": Decimal(value),
        "provider": provider,
        "source_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "derived": False,
    }


@pytest.fixture
def pairs() -> None:
    make_items("BTC-USD", "ETH-RUB", "ETH-USD")


async def test_it_sends_the_snapshot_first_from_the_database(pairs: None) -> None:
    from asgiref.sync import sync_to_async

    @sync_to_async
    def store() -> None:
        store_current(Item.objects.get(code="BTC-USD"), "binance", "54000.000123", version=4)

    await store()
    ws = await connect("/ws/items?pairs=BTC-USD,ETH-RUB")
    first = await receive(ws)
    assert first["type"] == "snapshot"
    assert first["data"]["pairs"] == ["BTC-USD", "ETH-RUB"]
    [course] = first["data"]["courses"]  # ETH-RUB was never quoted: left out
    assert course["direction"] == "BTC-USD"
    assert course["provider"] == "binance"
    assert Decimal(str(course["value"])) == Decimal("54000.000123")
    assert course["stale"] is False
    assert (course["status"], course["version"]) == ("live", 4)
    await ws.disconnect()


async def test_it_reports_an_unknown_pair_and_keeps_the_socket_open(pairs: None) -> None:
    ws = await connect("/ws/items?pairs=btc-usd,NOPE-XYZ")
    snapshot_message = await receive(ws)
    assert snapshot_message["type"] == "snapshot"
    assert snapshot_message["data"]["pairs"] == ["BTC-USD"]
    error = await receive(ws)
    assert error == {"type": "error", "detail": "unknown pair(s): NOPE-XYZ"}
    await ws.send_to(text_data='{"action": "ping"}')
    assert await receive(ws) == {"type": "pong"}
    await ws.disconnect()


async def test_it_answers_ping_as_json_and_as_plain_text(pairs: None) -> None:
    ws = await connect()
    await receive(ws)
    await ws.send_to(text_data="ping")
    assert await receive(ws) == {"type": "pong"}
    await ws.send_to(text_data=json.dumps({"action": "ping"}))
    assert await receive(ws) == {"type": "pong"}
    await ws.disconnect()


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        ("{not json", "bad JSON"),
        # Nested deeper than the decoder's recursion limit: a RecursionError, not a ValueError.
        pytest.param("[" * 2000 + "]" * 2000, "bad JSON", id="nested-2000-deep"),
        ("[1, 2]", "expected a JSON object with an action"),
        ('{"action": "dance"}', "unknown action 'dance': use subscribe, unsubscribe or ping"),
        ('{"pairs": ["BTC-USD"]}', "unknown action None: use subscribe, unsubscribe or ping"),
        ('{"action": "subscribe"}', "pairs: a list of 1 to 100 pair codes"),
        ('{"action": "subscribe", "pairs": []}', "pairs: a list of 1 to 100 pair codes"),
        ('{"action": "subscribe", "pairs": "BTC-USD"}', "pairs: a list of 1 to 100 pair codes"),
        ('{"action": "unsubscribe", "pairs": [1]}', "pairs: a list of 1 to 100 pair codes"),
        ('{"action": "subscribe", "pairs": ["NOPE-XYZ"]}', "unknown pair(s): NOPE-XYZ"),
        ('{"action": "ping", "pad": "' + "x" * 4100 + '"}', "message over 4 KiB"),
    ],
)
async def test_it_answers_bad_input_with_an_error_and_stays_open(
    pairs: None, message: str, detail: str
) -> None:
    ws = await connect()
    await receive(ws)
    await ws.send_to(text_data=message)
    assert await receive(ws) == {"type": "error", "detail": detail}
    await ws.send_to(text_data="ping")
    assert await receive(ws) == {"type": "pong"}
    await ws.disconnect()


async def test_it_rejects_binary_messages_and_stays_open(pairs: None) -> None:
    ws = await connect()
    await receive(ws)
    await ws.send_to(bytes_data=b"\x00\x01")
    error = await receive(ws)
    assert error["type"] == "error"
    assert "binary" in error["detail"]
    await ws.send_to(text_data="ping")
    assert await receive(ws) == {"type": "pong"}
    await ws.disconnect()


async def test_it_filters_rate_events_by_pair_and_sends_other_events_to_all(pairs: None) -> None:
    btc = await connect("/ws/items?pairs=BTC-USD")
    everything = await connect("/ws/items")
    await receive(btc)
    await receive(everything)

    events.publish("rate.updated", rate_event("ETH-RUB", "250000.5"))
    events.publish("rate.updated", rate_event("BTC-USD", "54000.000000000000000001"))
    events.publish("provider.state", {"name": "binance", "state": "open", "reason": "5xx"})
    events.publish("fetch.completed", {"stored": 3, "providers": {"cbr": "ok"}, "duration_ms": 9})
    events.publish("item.updated", {"id": 1, "code": "ETH-USD", "is_active": True})

    got_all = [await receive(everything) for _ in range(5)]
    assert [m["type"] for m in got_all] == [
        "rate.updated",
        "rate.updated",
        "provider.state",
        "fetch.completed",
        "item.updated",
    ]
    assert got_all[0]["data"]["direction"] == "ETH-RUB"
    raw_btc = await btc.receive_from(3)
    # The value crosses the socket exactly, as a JSON number, never through a float.
    assert '"value":54000.000000000000000001' in raw_btc
    got_btc = [json.loads(raw_btc)] + [await receive(btc) for _ in range(3)]
    assert [m["type"] for m in got_btc] == [
        "rate.updated",
        "provider.state",
        "fetch.completed",
        "item.updated",
    ]
    for message in got_btc:
        assert set(message) >= {"type", "data", "ts", "id"}
    assert await btc.receive_nothing(0.1)
    await btc.disconnect()
    await everything.disconnect()


async def test_subscribe_and_unsubscribe_change_what_arrives(pairs: None) -> None:
    ws = await connect("/ws/items?pairs=BTC-USD")
    observer = await connect("/ws/items?pairs=ETH-RUB")
    await receive(ws)
    await receive(observer)
    events.publish("rate.updated", rate_event("ETH-RUB", "1"))
    await receive_until(observer, "rate.updated")  # the snapshot has it now
    await observer.disconnect()
    await ws.send_to(text_data=json.dumps({"action": "subscribe", "pairs": ["eth-rub"]}))
    ack = await receive(ws)
    assert ack["type"] == "snapshot"
    assert ack["data"]["pairs"] == ["BTC-USD", "ETH-RUB"]
    assert [c["direction"] for c in ack["data"]["courses"]] == ["ETH-RUB"]

    events.publish("rate.updated", rate_event("ETH-RUB", "2"))
    update = await receive(ws)
    assert (update["type"], update["data"]["direction"]) == ("rate.updated", "ETH-RUB")

    await ws.send_to(text_data=json.dumps({"action": "unsubscribe", "pairs": ["BTC-USD"]}))
    ack = await receive(ws)
    assert ack["data"]["pairs"] == ["ETH-RUB"]
    events.publish("rate.updated", rate_event("BTC-USD", "3"))
    events.publish("rate.updated", rate_event("ETH-RUB", "4"))
    update = await receive(ws)
    # BTC-USD was published first; the first thing to arrive is ETH-RUB: BTC-USD never came.
    assert (update["data"]["direction"], update["data"]["value"]) == ("ETH-RUB", 4)
    await ws.disconnect()


async def test_unsubscribing_from_all_keeps_the_other_active_pairs(pairs: None) -> None:
    ws = await connect()
    await receive(ws)
    await ws.send_to(text_data=json.dumps({"action": "unsubscribe", "pairs": ["BTC-USD"]}))
    ack = await receive(ws)
    assert "BTC-USD" not in ack["data"]["pairs"]
    assert {"ETH-RUB", "ETH-USD"} <= set(ack["data"]["pairs"])
    await ws.disconnect()


async def test_it_sends_a_tick_every_heartbeat(pairs: None, settings: LazySettings) -> None:
    settings.KURS_WS_HEARTBEAT = 0.05
    ws = await connect()
    await receive(ws)
    first = await receive_until(ws, "tick", wait=2)
    second = await receive_until(ws, "tick", wait=2)
    assert first["ts"] <= second["ts"]
    await ws.disconnect()


async def test_item_events_keep_the_set_of_known_pairs_current(pairs: None) -> None:
    ws = await connect()
    await receive(ws)
    events.publish("item.created", {"id": 99, "code": "SOL-USD", "is_active": True})
    await receive_until(ws, "item.created")
    assert "SOL-USD" in snapshot.active_pairs()
    await ws.send_to(text_data=json.dumps({"action": "subscribe", "pairs": ["SOL-USD"]}))
    assert (await receive(ws))["type"] == "snapshot"
    events.publish("item.deleted", {"id": 99, "code": "SOL-USD"})
    await receive_until(ws, "item.deleted")
    assert "SOL-USD" not in snapshot.active_pairs()
    await ws.disconnect()


async def test_an_event_older_than_the_snapshot_is_dropped_without_an_error(
    pairs: None,
) -> None:
    # The bridge handles events in loop callbacks: an exception there reaches the loop's handler.
    crashes: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: crashes.append(context))
    ws = await connect("/ws/items?pairs=ETH-USD")
    await receive(ws)

    def publish(value: str, version: int) -> None:
        events.publish("rate.updated", {**rate_event("ETH-USD", value), "version": version})

    publish("3000", 5)
    assert (await receive_until(ws, "rate.updated"))["data"]["version"] == 5
    # Version 4 after 5: stale news, neither applied nor sent (nor a crash in the bridge).
    publish("2900", 4)
    events.publish("provider.state", {"name": "marker", "state": "closed", "reason": ""})
    assert (await receive(ws))["type"] == "provider.state"
    assert snapshot.courses(["ETH-USD"])[0]["version"] == 5
    publish("3100", 6)
    assert (await receive_until(ws, "rate.updated"))["data"]["version"] == 6
    assert crashes == []
    await ws.disconnect()


async def test_rate_events_update_the_snapshot(pairs: None) -> None:
    ws = await connect("/ws/items?pairs=ETH-USD")
    await receive(ws)
    events.publish("rate.updated", rate_event("ETH-USD", "3100.25", provider="bybit"))
    await receive_until(ws, "rate.updated")
    [course] = snapshot.courses(["ETH-USD"])
    assert (course["value"], course["provider"]) == (Decimal("3100.25"), "bybit")
    await ws.disconnect()
    reconnect = await connect("/ws/items?pairs=ETH-USD")
    first = await receive(reconnect)
    assert first["data"]["courses"][0]["value"] == 3100.25
    await reconnect.disconnect()


async def test_the_socket_refuses_a_foreign_origin(pairs: None) -> None:
    from config.asgi import application

    ws = WebsocketCommunicator(application, "/ws/items", headers=[(b"origin", b"http://evil")])
    connected, _ = await ws.connect(timeout=5)
    assert not connected
    await ws.disconnect()


async def test_the_bridge_starts_once_per_loop(pairs: None) -> None:
    first = await connect()
    second = await connect()
    assert bridge.running
    await first.disconnect()
    await second.disconnect()


def marker(name: str) -> None:
    events.publish("provider.state", {"name": name, "state": "closed", "reason": ""})


async def next_kind(ws: WebsocketCommunicator, name: str) -> tuple[str, object]:
    """The next rate value or marker name, ticks skipped: what the client actually got."""
    while True:
        message = await receive(ws)
        if message["type"] == "rate.updated":
            return ("rate", message["data"]["value"])
        if message["type"] == "provider.state":
            return ("marker", message["data"]["name"])


async def test_a_subscribe_action_sets_min_change_with_exact_counts(pairs: None) -> None:
    ws = await connect("/ws/items?pairs=ETH-USD")
    await receive(ws)
    await ws.send_to(
        text_data=json.dumps({"action": "subscribe", "pairs": ["BTC-USD"], "min_change": 0.01})
    )
    ack = await receive_until(ws, "snapshot")
    assert ack["data"]["pairs"] == ["BTC-USD", "ETH-USD"]
    # Each step is followed by a marker, so an update the policy let through would show before it.
    steps: list[tuple[str, str, str | None]] = [
        ("100", "binance", "first"),  # a pair's first update passes
        ("100.5", "binance", None),  # 0.5 %: held back
        ("99.3", "binance", None),  # 0.7 %: held back
        ("101", "binance", "moved"),  # 1 % from the last delivered
        ("101", "coingecko", "provider"),  # the serving provider changed: passes
    ]
    got = []
    for n, (value, provider, _) in enumerate(steps):
        events.publish("rate.updated", rate_event("BTC-USD", value, provider))
        marker(f"m{n}")
        while (item := await next_kind(ws, f"m{n}")) != ("marker", f"m{n}"):
            got.append(item)
    assert got == [("rate", 100), ("rate", 101), ("rate", 101)]
    await ws.disconnect()


async def test_options_in_the_query_string_and_bad_ones_answered(pairs: None) -> None:
    ws = await connect("/ws/items?pairs=BTC-USD&min_interval_ms=60000")
    await receive(ws)
    events.publish("rate.updated", rate_event("BTC-USD", "1"))
    assert await next_kind(ws, "") == ("rate", 1)
    events.publish("rate.updated", rate_event("BTC-USD", "2"))  # inside the minute: pending
    marker("after")
    assert await next_kind(ws, "") == ("marker", "after")
    await ws.disconnect()
    bad = await connect("/ws/items?min_change=lots&min_interval_ms=-5")
    assert (await receive(bad))["type"] == "snapshot"
    assert await receive(bad) == {
        "type": "error",
        "detail": "min_interval_ms: expected 0 to 3600000",
    }
    await bad.send_to(text_data=json.dumps({"action": "subscribe", "min_change": 7}))
    assert await receive(bad) == {
        "type": "error",
        "detail": "min_change: expected a fraction from 0 to 1",
    }
    # Options alone keep the pairs; the snapshot acknowledges.
    await bad.send_to(text_data=json.dumps({"action": "subscribe", "min_interval_ms": 10}))
    ack = await receive_until(bad, "snapshot")
    assert ack["data"]["pairs"] is None
    await bad.disconnect()
