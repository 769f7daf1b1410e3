"""`rate_current`: the latest rate of an item with failover applied to the history."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from items.models import Item
from rates.models import Rate
from rates.selectors import rate_current

pytestmark = pytest.mark.django_db


@pytest.fixture
def item() -> Item:
    return Item.objects.get(code="BTC-USD")


def store(item: Item, provider: str, value: str, age_s: float) -> Rate:
    at = timezone.now() - timedelta(seconds=age_s)
    return Rate.objects.create(
        item=item, provider=provider, value=value, source_time=at, received_at=at
    )


def test_no_history_is_none(item: Item, rate_settings: object) -> None:
    assert rate_current(item=item) is None


def test_the_highest_priority_current_provider_wins_over_a_newer_row(
    item: Item, rate_settings: object
) -> None:
    binance = store(item, "binance", "90000", age_s=20)
    store(item, "bybit", "90010", age_s=1)
    store(item, "coingecko", "89990", age_s=0)
    assert rate_current(item=item) == binance


def test_an_unchanged_value_stays_current_for_the_storage_period(
    item: Item, rate_settings: object
) -> None:
    # Stored 70 s ago and not since: unchanged values are written again only every 60 s.
    binance = store(item, "binance", "90000", age_s=70)
    store(item, "bybit", "90010", age_s=1)
    assert rate_current(item=item) == binance


def test_a_silent_provider_fails_over_to_the_next(item: Item, rate_settings: object) -> None:
    store(item, "binance", "90000", age_s=300)
    bybit = store(item, "bybit", "90010", age_s=2)
    assert rate_current(item=item) == bybit


def test_direct_quotes_outrank_cross_rates(item: Item, rate_settings: object) -> None:
    store(item, "binance+cbr", "90000", age_s=1)
    coingecko = store(item, "coingecko", "90020", age_s=5)
    assert rate_current(item=item) == coingecko


def test_when_nothing_is_current_the_newest_row_is_the_last_known_value(
    item: Item, rate_settings: object
) -> None:
    store(item, "binance", "90000", age_s=900)
    newest = store(item, "bybit", "90010", age_s=600)
    assert rate_current(item=item) == newest
