"""The in-process rates snapshot: loaded from the database, kept current from events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.conf import LazySettings

from items.models import Item
from rates.snapshot import RatesSnapshot
from rates.tests.support import store_current

pytestmark = pytest.mark.django_db

NOW = datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def store(
    code: str, provider: str, value: str, *, age_s: float, active: bool = True, version: int = 1
) -> None:
    base, quote = code.split("-")
    item, _ = Item.objects.get_or_create(base=base, quote=quote, defaults={"is_active": active})
    store_current(item, provider, value, checked_ago=age_s, version=version)


def test_it_loads_the_current_rate_of_each_active_item() -> None:
    Item.objects.all().delete()
    store("BTC-USD", "bybit", "54000.000000000000000001", age_s=5, version=9)
    store("ETH-USD", "binance", "3000", age_s=2, active=False)
    store("SOL-USD", "binance", "150", age_s=31)
    snapshot = RatesSnapshot()
    snapshot.load()
    assert snapshot.active_pairs() == {"BTC-USD", "SOL-USD"}
    btc, sol = snapshot.courses()
    assert btc["direction"] == "BTC-USD"
    assert btc["value"] == Decimal("54000.000000000000000001")
    assert (btc["provider"], btc["version"], btc["status"]) == ("bybit", 9, "live")
    assert btc["stale"] is False
    # Staleness is judged when read: 31 s since binance confirmed it (window 30 s).
    assert (sol["status"], sol["stale"]) == ("stale", True)


def test_an_older_version_never_overwrites_a_newer_one() -> None:
    snapshot = RatesSnapshot()
    snapshot.apply_item("item.created", {"code": "BTC-USD", "is_active": True})
    event = {"direction": "BTC-USD", "provider": "bybit", "source_time": iso(NOW)}
    assert snapshot.apply_rate({**event, "value": "101", "version": 5}) is not None
    assert snapshot.apply_rate({**event, "value": "100", "version": 4}) is None
    assert snapshot.apply_rate({**event, "value": "100", "version": 5}) is None
    [course] = snapshot.courses()
    assert (course["value"], course["version"]) == (Decimal("101"), 5)
    assert snapshot.apply_rate({**event, "value": "102", "version": 6}) is not None
    assert snapshot.courses()[0]["value"] == Decimal("102")


def test_an_event_newer_than_the_database_row_survives_the_load() -> None:
    Item.objects.all().delete()
    store("BTC-USD", "binance", "54000", age_s=10)
    snapshot = RatesSnapshot()
    snapshot.apply_rate(
        {
            "direction": "BTC-USD",
            "value": "54100",
            "provider": "bybit",
            "source_time": iso(NOW),
            "derived": False,
            "version": 2,
        }
    )
    snapshot.load()
    [course] = snapshot.courses(["BTC-USD"])
    assert (course["value"], course["provider"]) == (Decimal("54100"), "bybit")


def test_staleness_follows_the_provider_freshness_window(settings: LazySettings) -> None:
    settings.KURS_STALE_AFTER = 30
    snapshot = RatesSnapshot()
    snapshot.apply_item("item.created", {"code": "USD-RUB", "is_active": True})
    snapshot.apply_item("item.created", {"code": "BTC-RUB", "is_active": True})
    old = iso(NOW - timedelta(hours=2))
    for direction, provider in [("USD-RUB", "cbr"), ("BTC-RUB", "coingecko")]:
        snapshot.apply_rate(
            {"direction": direction, "value": 80, "provider": provider, "source_time": old}
        )
    stale = {c["direction"]: c["stale"] for c in snapshot.courses()}
    assert stale == {"USD-RUB": False, "BTC-RUB": True}  # CBR rates are daily, CoinGecko's not


def test_item_events_change_the_active_pairs_and_bump_the_version() -> None:
    snapshot = RatesSnapshot()
    version = snapshot.version
    snapshot.apply_item("item.created", {"code": "SOL-USD", "is_active": True})
    assert snapshot.active_pairs() == {"SOL-USD"}
    snapshot.apply_item("item.updated", {"code": "SOL-USD", "is_active": False})
    assert snapshot.active_pairs() == set()
    snapshot.apply_item("item.updated", {"code": "SOL-USD", "is_active": True})
    snapshot.apply_item("item.deleted", {"id": 1, "code": "SOL-USD"})
    assert snapshot.active_pairs() == set()
    assert snapshot.version == version + 4


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"direction": "BTC-USD", "value": "x", "provider": "b", "source_time": iso(NOW)},
        {"direction": "BTC-USD", "value": "1", "provider": "b", "source_time": "yesterday"},
    ],
)
def test_a_malformed_rate_event_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"malformed rate\.updated"):
        RatesSnapshot().apply_rate(data)
