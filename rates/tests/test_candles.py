"""Candles of an item's history, against hand-computed OHLC. SQLite and PostgreSQL.

What they promise: docs/api.md#get-apiv1itemsidcandles.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from items.models import Item
from rates.exceptions import InvalidQuery
from rates.models import Rate
from rates.selectors import (
    MAX_CANDLES,
    Candle,
    CandleInterval,
    candle_list,
    candle_provider,
    candle_range,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("rate_settings")]

T0 = datetime(2026, 3, 14, tzinfo=UTC)
HUGE = "12345678901234567890.123456789012345678"  # 38 digits: the widest value a Rate holds
TINY_ABOVE_99 = "99.000000000000000001"


@pytest.fixture
def item() -> Item:
    return Item.objects.get_or_create(base="BTC", quote="USD")[0]


def add(item: Item, provider: str, at: datetime, value: str) -> Rate:
    return Rate.objects.create(
        item=item, provider=provider, value=Decimal(value), source_time=at, received_at=at
    )


@pytest.fixture
def history(item: Item) -> None:
    """Binance's rates around T0 (the edges of the 1-minute buckets) plus other providers'."""
    seconds = timedelta(seconds=1)
    for offset, value in [
        (timedelta(0), "100"),  # exactly a bucket's start: in it
        (30 * seconds, "105.5"),
        (timedelta(seconds=59, microseconds=999_999), TINY_ABOVE_99),  # last instant of 00:00
        (60 * seconds, "101"),  # exactly 00:01: the next bucket
        (60 * seconds, "102"),  # same instant, later id: the close
        (180 * seconds, "7"),  # below "101" as a number, above it as unpadded text
        (190 * seconds, HUGE),
        (300 * seconds, "50"),  # exactly 00:05: a new 5-minute bucket
    ]:
        add(item, "binance", T0 + offset, value)
    # Other providers quote the same minutes with other prices: never mixed into binance's.
    add(item, "bybit", T0 + 10 * seconds, "1")
    add(item, "bybit", T0 + 20 * seconds, "1000")
    add(item, "binance+cbr", T0 + 15 * seconds, "2")


def candle(t: datetime, o: str, h: str, low: str, c: str, n: int) -> Candle:
    return Candle(t, Decimal(o), Decimal(h), Decimal(low), Decimal(c), n)


def candles(item: Item, interval: str, *, provider: str = "binance", **range_: Any) -> list[Candle]:
    since = range_.get("since", T0 - timedelta(hours=1))
    until = range_.get("until", T0 + timedelta(hours=1))
    return candle_list(
        item=item, interval=CandleInterval(interval), since=since, until=until, provider=provider
    )


@pytest.mark.usefixtures("history")
def test_it_builds_one_minute_candles_with_exact_values_and_bucket_edges(item: Item) -> None:
    assert candles(item, "1m") == [
        candle(T0, "100", "105.5", TINY_ABOVE_99, TINY_ABOVE_99, 3),
        candle(T0 + timedelta(minutes=1), "101", "102", "101", "102", 2),
        # 00:02 has no rate: no candle.
        candle(T0 + timedelta(minutes=3), "7", HUGE, "7", HUGE, 2),
        candle(T0 + timedelta(minutes=5), "50", "50", "50", "50", 1),
    ]


@pytest.mark.usefixtures("history")
def test_it_builds_wider_candles_from_the_same_rows(item: Item) -> None:
    assert candles(item, "5m") == [
        candle(T0, "100", HUGE, "7", HUGE, 7),
        candle(T0 + timedelta(minutes=5), "50", "50", "50", "50", 1),
    ]
    whole = candle(T0, "100", HUGE, "7", "50", 8)
    assert candles(item, "1h") == [whole]
    assert candles(item, "1d", since=T0, until=T0 + timedelta(days=1)) == [whole]


@pytest.mark.usefixtures("history")
def test_until_is_exclusive_and_since_inclusive(item: Item) -> None:
    got = candles(item, "5m", since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=5))
    assert got == [candle(T0, "101", HUGE, "7", HUGE, 4)]


@pytest.mark.usefixtures("history")
def test_it_uses_only_the_asked_providers_rows(item: Item) -> None:
    assert candles(item, "1m", provider="bybit") == [candle(T0, "1", "1000", "1", "1000", 2)]
    assert candles(item, "1m", provider="binance+cbr") == [candle(T0, "2", "2", "2", "2", 1)]
    assert candles(item, "1m", provider="kraken") == []


@pytest.mark.usefixtures("history")
def test_the_default_provider_is_the_highest_priority_one_with_rows_in_range(
    item: Item, settings: Any
) -> None:
    hour = {"since": T0 - timedelta(hours=1), "until": T0 + timedelta(hours=1)}
    assert candle_provider(item=item, **hour) == "binance"
    settings.KURS_PROVIDERS = ["bybit", "binance", "coingecko", "cbr"]
    assert candle_provider(item=item, **hour) == "bybit"
    # Only the cross rate has rows between 00:00:12 and 00:00:18: derived is better than none.
    assert (
        candle_provider(
            item=item, since=T0 + timedelta(seconds=12), until=T0 + timedelta(seconds=18)
        )
        == "binance+cbr"
    )
    assert (
        candle_provider(item=item, since=T0 + timedelta(days=1), until=T0 + timedelta(days=2))
        is None
    )


def test_the_range_defaults_to_a_span_per_interval_ending_now() -> None:
    now = datetime(2026, 3, 14, 12, 34, 56, 789, tzinfo=UTC)
    since, until = candle_range(interval=CandleInterval.M1, since=None, until=None, now=now)
    assert until == now
    assert since == datetime(2026, 3, 14, 6, 34, tzinfo=UTC)  # 6 h back, to the minute
    since, _ = candle_range(interval=CandleInterval.D1, since=None, until=None, now=now)
    assert since == datetime(2025, 12, 14, tzinfo=UTC)  # 90 days back, to UTC midnight


def test_since_is_rounded_down_to_a_candle_start() -> None:
    since, until = candle_range(
        interval=CandleInterval.M5,
        since=T0 + timedelta(minutes=7, seconds=59, microseconds=1),
        until=T0 + timedelta(hours=1),
    )
    assert (since, until) == (T0 + timedelta(minutes=5), T0 + timedelta(hours=1))


def test_it_refuses_more_than_max_candles_and_empty_ranges() -> None:
    limit = timedelta(minutes=MAX_CANDLES)
    assert candle_range(interval=CandleInterval.M1, since=T0, until=T0 + limit)[0] == T0
    with pytest.raises(InvalidQuery) as too_many:
        candle_range(interval=CandleInterval.M1, since=T0, until=T0 + limit + timedelta(seconds=1))
    assert too_many.value.field == "since"
    with pytest.raises(InvalidQuery) as empty:
        candle_range(interval=CandleInterval.M1, since=T0, until=T0)
    assert empty.value.field == "until"


# --- The endpoint --------------------------------------------------------------------------------
def get(client: Client, item: Item, query: str) -> Any:
    return client.get(f"/api/v1/items/{item.id}/candles?{query}")


@pytest.mark.usefixtures("history")
def test_the_endpoint_answers_exact_json_numbers_and_names_the_provider(
    client: Client, item: Item
) -> None:
    response = get(client, item, "interval=5m&since=2026-03-14T00:00:00Z&until=2026-03-14T01:00Z")
    assert response.status_code == 200, response.content
    assert response["Kurs-Provider"] == "binance"
    body = json.loads(response.content, parse_float=Decimal)
    assert body == [
        {
            "t": "2026-03-14T00:00:00Z",
            "open": 100,
            "high": Decimal(HUGE),
            "low": 7,
            "close": Decimal(HUGE),
            "n": 7,
        },
        {"t": "2026-03-14T00:05:00Z", "open": 50, "high": 50, "low": 50, "close": 50, "n": 1},
    ]
    # The digits on the wire, not only the parsed value.
    assert f'"high":{HUGE}' in response.content.decode()


@pytest.mark.usefixtures("history")
def test_the_endpoint_takes_a_provider_with_a_plus_and_empty_parameters_as_absent(
    client: Client, item: Item
) -> None:
    response = get(
        client, item, "since=2026-03-14T00:00Z&until=2026-03-14T00:01Z&provider=binance+cbr"
    )
    assert response.status_code == 200, response.content
    assert response["Kurs-Provider"] == "binance+cbr"
    assert [c["n"] for c in response.json()] == [1]
    response = get(client, item, "interval=1m&since=&until=&provider=")
    assert response.status_code == 200, response.content
    assert response.json() == []  # the default range ends now; the rows are from 2026-03-14


def test_the_endpoint_defaults_to_recent_one_minute_candles(client: Client, item: Item) -> None:
    now = timezone.now()
    add(item, "binance", now - timedelta(hours=1), "90000")
    add(item, "binance", now - timedelta(hours=7), "80000")  # outside the default 6 h
    response = get(client, item, "")
    assert response.status_code == 200, response.content
    assert [(c["open"], c["n"]) for c in response.json()] == [(90000, 1)]


def test_an_item_without_rates_has_no_candles(client: Client, item: Item) -> None:
    response = get(client, item, "interval=1h")
    assert response.status_code == 200
    assert response.json() == []
    assert "Kurs-Provider" not in response


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("interval=2m", "interval"),
        ("since=2026-03-14T00:00Z&until=2026-03-15T00:00Z", "since"),  # 1440 one-minute candles
        ("since=2026-03-14T00:00Z&until=2026-03-14T00:00Z", "until"),
        ("since=2026-03-14T01:00Z&until=2026-03-14T00:00Z", "until"),
        ("since=yesterday", "since"),
        ("until=0001-01-01T00:00:00%2B01:00", "until"),
        ("provider=" + "x" * 33, "provider"),
    ],
)
def test_the_endpoint_answers_422_naming_the_field(
    client: Client, item: Item, query: str, field: str
) -> None:
    response = get(client, item, query)
    assert response.status_code == 422, response.content
    assert any(error["field"] == field for error in response.json()["errors"])


def test_a_range_near_the_start_of_time_is_no_500(client: Client, item: Item) -> None:
    response = get(client, item, "interval=1d&until=0001-01-02T00:00Z")
    assert response.status_code == 200, response.content
    assert response.json() == []


def test_an_unknown_item_is_404(client: Client) -> None:
    response = client.get("/api/v1/items/999999/candles")
    assert response.status_code == 404
    assert "detail" in response.json()


def test_the_openapi_schema_declares_the_answers(client: Client) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    answers = spec["paths"]["/api/v1/items/{item_id}/candles"]["get"]["responses"]
    assert set(answers) == {"200", "404", "422", "429"}
    ok = answers["200"]["content"]["application/json"]["schema"]
    assert ok["items"] == {"$ref": "#/components/schemas/CandleOut"}
    candle = spec["components"]["schemas"]["CandleOut"]["properties"]
    assert [candle[name]["type"] for name in ("open", "high", "low", "close", "n")] == [
        "number",
        "number",
        "number",
        "number",
        "integer",
    ]
    interval = next(
        p
        for p in spec["paths"]["/api/v1/items/{item_id}/candles"]["get"]["parameters"]
        if p["name"] == "interval"
    )
    # Optional, so empty is absent too (docs/api.md#query-parameters): the enum is the first
    # alternative.
    assert interval["schema"]["anyOf"][0]["allOf"][0]["enum"] == ["1m", "5m", "1h", "1d"]
