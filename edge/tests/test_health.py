"""`GET /api/v1/health` against the real components of the test process."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from edge import health
from items.models import Item
from rates.lease import lease_try_acquire
from rates.tests.support import store_current
from tests.services import require

pytestmark = pytest.mark.django_db

COMPONENTS = {"database", "cache", "channel_layer", "nats", "providers", "freshness", "pegs"}


def test_it_reports_every_component(client: Client) -> None:
    require("NATS", "127.0.0.1", 4222)
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert set(body["components"]) == COMPONENTS
    for name in ("database", "cache", "channel_layer", "nats", "providers"):
        assert body["components"][name]["status"] == "ok", (name, body["components"][name])
    # Nothing fetched yet: the service answers, but says its rates are not fresh.
    assert body["components"]["freshness"]["status"] == "degraded"
    assert body["status"] == "degraded"


def test_it_is_ok_when_every_component_is(client: Client) -> None:
    require("NATS", "127.0.0.1", 4222)
    store_current(Item.objects.get(code="BTC-USD"), "binance", "90000")
    body = client.get("/api/v1/health").json()
    assert body["components"]["freshness"]["status"] == "ok"
    assert body["components"]["freshness"]["stale"] == []
    assert body["status"] == "ok"


def test_a_stale_current_rate_makes_freshness_degraded_and_names_the_pair(client: Client) -> None:
    store_current(Item.objects.get(code="BTC-USD"), "binance", "90000")
    store_current(Item.objects.get(code="ETH-USD"), "binance", "3000", checked_ago=31)
    freshness = client.get("/api/v1/health").json()["components"]["freshness"]
    assert freshness["status"] == "degraded"
    assert freshness["stale"] == ["ETH-USD"]
    assert freshness["quoted"] == 2


def test_a_failing_database_is_down_with_503(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> dict[str, Any]:
        raise ConnectionError("connection refused")

    monkeypatch.setitem(health.CHECKS, "database", broken)
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert "connection refused" in body["components"]["database"]["detail"]


def test_a_hanging_component_times_out_as_down(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    async def hangs() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    monkeypatch.setattr(health, "CHECK_TIMEOUT", 0.05)
    monkeypatch.setitem(health.CHECKS, "cache", hangs)
    body = client.get("/api/v1/health").json()
    assert body["components"]["cache"]["status"] == "down"
    assert body["status"] == "degraded"


def test_it_names_the_owner_of_live_rates(client: Client) -> None:
    assert client.get("/api/v1/health").json()["components"]["providers"]["owner"] is None
    lease_try_acquire(holder="fetcher-host:42:ab12")
    owner = client.get("/api/v1/health").json()["components"]["providers"]["owner"]
    assert (owner["holder"], owner["epoch"]) == ("fetcher-host:42:ab12", 1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("failures", "status"), [(1, "ok"), (2, "down")])
def test_a_database_connection_that_ended_is_pinged_again_on_a_new_one(
    monkeypatch: pytest.MonkeyPatch, failures: int, status: str
) -> None:
    """One worker's connection terminated (a restart, an administrator) is not the database
    down: health asks once more on a new connection first."""
    from django.db import OperationalError, connection

    left = [failures]
    original = health._select_one
    opened: list[object] = []

    def select_one() -> None:
        opened.append(connection.connection)
        if left[0]:
            left[0] -= 1
            raise OperationalError("terminating connection due to administrator command")
        original()

    monkeypatch.setattr(health, "_select_one", select_one)
    database = async_to_sync(health._run)("database", health.check_database)
    assert database["status"] == status, database
    assert left == [0]
    assert len(opened) == 2
