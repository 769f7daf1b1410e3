"""`expand=sources` on the WebSocket (query and subscribe action) and the SSE stream: rate
updates and snapshot courses keep their `sources` only for subscribers that asked
(docs/events.md#expand-sources). Events go through the real bridge and hub (the fallback path of
this process, as in test_consumers.py); SSE over real HTTP (uvicorn in this process)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from asgiref.sync import sync_to_async

from items.models import Item
from realtime import events
from realtime.tests.conftest import connect, receive
from realtime.tests.test_sse import next_event, sse_events

pytestmark = pytest.mark.django_db(transaction=True)

SOURCES = [
    {
        "provider": "binance",
        "value": Decimal("97000"),
        "bid": None,
        "ask": None,
        "source_time": "2026-12-07T01:00:00Z",
        "excluded": False,
        "reason": None,
    },
    {
        "provider": "bybit",
        "value": Decimal("101850"),
        "bid": None,
        "ask": None,
        "source_time": "2026-12-07T01:00:00Z",
        "excluded": True,
        "reason": "outlier",
    },
]


def consensus_event(version: int) -> dict[str, object]:
    return {
        "direction": "BTC-USD",
        "value": Decimal("97000"),
        "provider": "consensus",
        "source_time": datetime.now(UTC).isoformat(),
        "checked_at": datetime.now(UTC).isoformat(),
        "status": "thin",
        "derived": False,
        "route": [],
        "version": version,
        "mode": "consensus",
        "n_sources": 1,
        "dispersion_bps": None,
        "bid": None,
        "ask": None,
        "spread_bps": None,
        "sources": SOURCES,
    }


@pytest.fixture
async def btc_usd() -> None:
    await sync_to_async(Item.objects.get_or_create)(base="BTC", quote="USD")


@pytest.mark.usefixtures("btc_usd")
async def test_a_websocket_gets_sources_only_when_it_asks() -> None:
    plain = await connect("/ws/items?pairs=BTC-USD")
    expanded = await connect("/ws/items?pairs=BTC-USD&expand=sources")
    later = await connect("/ws/items?pairs=BTC-USD")
    for ws in (plain, expanded, later):
        assert (await receive(ws))["type"] == "snapshot"
    await later.send_to(text_data='{"action": "subscribe", "expand": "sources"}')
    acknowledged = await receive(later)
    assert acknowledged["type"] == "snapshot"
    events.publish("rate.updated", consensus_event(1))
    got_plain = await receive(plain)
    assert got_plain["data"]["n_sources"] == 1
    assert got_plain["data"]["mode"] == "consensus"
    assert "sources" not in got_plain["data"]
    for ws in (expanded, later):
        data = (await receive(ws))["data"]
        assert [(s["provider"], s["excluded"], s["reason"]) for s in data["sources"]] == [
            ("binance", False, None),
            ("bybit", True, "outlier"),
        ]
    # A new expanded socket's snapshot lists the sources of what the bridge applied.
    fresh = await connect("/ws/items?pairs=BTC-USD&expand=sources")
    [course] = (await receive(fresh))["data"]["courses"]
    assert [s["provider"] for s in course["sources"]] == ["binance", "bybit"]
    assert course["sources"][1]["age_s"] >= 0
    assert course["n_sources"] == 1
    bad = await connect("/ws/items?pairs=BTC-USD&expand=everything")
    await receive(bad)
    assert await receive(bad) == {"type": "error", "detail": "expand: expected sources"}
    for ws in (plain, expanded, later, fresh, bad):
        await ws.disconnect()


@pytest.mark.usefixtures("btc_usd")
async def test_the_sse_stream_gets_sources_only_when_it_asks(asgi_server: int) -> None:
    base = f"http://127.0.0.1:{asgi_server}"
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10.0)) as client:
        assert (await client.get("/api/v1/stream?expand=all")).status_code == 422
        async with (
            client.stream("GET", "/api/v1/stream?pairs=BTC-USD&expand=sources") as expanded,
            client.stream("GET", "/api/v1/stream?pairs=BTC-USD") as plain,
        ):
            with_sources, without = sse_events(expanded), sse_events(plain)
            await next_event(with_sources, "snapshot")
            await next_event(without, "snapshot")
            events.publish("rate.updated", consensus_event(2))
            data = (await next_event(with_sources, "rate.updated")).json["data"]
            assert [s["reason"] for s in data["sources"]] == [None, "outlier"]
            lean = (await next_event(without, "rate.updated")).json["data"]
            assert "sources" not in lean
            assert lean["n_sources"] == 1
