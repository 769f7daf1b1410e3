"""TradingView UDF (docs/api.md#tradingview-udf): the pure rules, and the endpoints against the
protocol's documented shapes (`{"s": "ok", "t", "o", "h", "l", "c", "v"}`, `{"s": "no_data",
"nextTime"}`, symbol info, search hits, the time as plain text). SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from items.models import Item
from rates import udf
from rates.exceptions import InvalidQuery
from rates.models import CurrentRate, Rate
from rates.selectors import Candle

T0 = datetime(2026, 3, 14, tzinfo=UTC)  # a Saturday, 00:00 UTC
S0 = int(T0.timestamp())


def candle(t: datetime, o: str, h: str, low: str, c: str, n: int) -> Candle:
    return Candle(t, Decimal(o), Decimal(h), Decimal(low), Decimal(c), n)


# --- pure rules ---------------------------------------------------------------------------------
def test_resolutions_map_to_native_candles_and_aliases() -> None:
    assert udf.SUPPORTED_RESOLUTIONS == ["1", "5", "15", "30", "60", "240", "1D"]
    assert udf.parse_resolution("D") == udf.parse_resolution("1d") == udf.RESOLUTIONS["1D"]
    assert [udf.RESOLUTIONS[r].factor for r in udf.SUPPORTED_RESOLUTIONS] == [1, 1, 3, 6, 1, 4, 1]
    with pytest.raises(InvalidQuery) as error:
        udf.parse_resolution("7")
    assert error.value.field == "resolution"


def test_the_window_holds_bars_starting_in_from_to() -> None:
    five = udf.RESOLUTIONS["5"]
    # from mid-bar: the bar that began before it belongs to the previous request.
    window = udf.history_window(five, start=S0 + 10, end=S0 + 900, countback=None)
    assert (window.first, window.last) == (S0 + 300, S0 + 600)
    assert window.until == T0 + timedelta(seconds=900)
    # to mid-bar: the bar it falls in is included, whole.
    window = udf.history_window(five, start=S0, end=S0 + 601, countback=None)
    assert (window.first, window.last, window.until) == (S0, S0 + 600, T0 + timedelta(minutes=15))
    with pytest.raises(InvalidQuery, match="earlier than to"):
        udf.history_window(five, start=S0, end=S0, countback=None)
    with pytest.raises(InvalidQuery, match="no bar start"):
        udf.history_window(five, start=S0 + 1, end=S0 + 299, countback=None)


def test_countback_wins_over_from_and_long_ranges_keep_their_latest_bars() -> None:
    one = udf.RESOLUTIONS["1"]
    window = udf.history_window(one, start=S0 - 10**6, end=S0 + 3600, countback=3)
    assert (window.first, window.last) == (S0 + 3600 - 180, S0 + 3600 - 60)
    window = udf.history_window(one, start=0, end=S0, countback=None)
    assert (window.last - window.first) // 60 + 1 == udf.MAX_BARS
    assert window.last == S0 - 60
    # A day of one-minute bars is one answer.
    day = udf.history_window(one, start=S0 - 86400, end=S0, countback=None)
    assert (day.last - day.first) // 60 + 1 == 1440


def test_aggregate_merges_candles_into_wider_bars() -> None:
    five = timedelta(minutes=5)
    candles = [
        candle(T0, "10", "12", "9", "11", 3),
        candle(T0 + five, "11", "15", "11", "14", 2),
        candle(T0 + 2 * five, "14", "14", "8", "9", 1),
        candle(T0 + 3 * five, "9", "9.5", "9", "9.5", 4),  # 00:15: the next 15-minute bar
    ]
    assert udf.aggregate(candles, 900) == [
        candle(T0, "10", "15", "8", "9", 6),
        candle(T0 + 3 * five, "9", "9.5", "9", "9.5", 4),
    ]
    assert udf.aggregate(candles, 300) == candles
    assert udf.aggregate([], 900) == []


def test_pricescale_shows_eight_significant_digits() -> None:
    assert udf.pricescale(Decimal("54000.12")) == 1000
    assert udf.pricescale(Decimal("92.5")) == 10**6
    assert udf.pricescale(Decimal("0.0123456")) == 10**9
    assert udf.pricescale(Decimal("5012345.67")) == 100
    assert udf.pricescale(None) == 100


# --- the endpoints ------------------------------------------------------------------------------


@pytest.fixture
def btc(db: None) -> Item:
    item = Item.objects.get_or_create(base="BTC", quote="USD")[0]
    # 00:00-00:09: one binance rate a minute (value 100 + minute), two in minute 3;
    # bybit has other prices in the same minutes (never mixed in).
    for minute in range(10):
        at = T0 + timedelta(minutes=minute)
        Rate.objects.create(
            item=item, provider="binance", value=Decimal(100 + minute), source_time=at,
            received_at=at,
        )  # fmt: skip
        Rate.objects.create(
            item=item, provider="bybit", value=Decimal(1), source_time=at, received_at=at
        )
    at = T0 + timedelta(minutes=3, seconds=30)
    Rate.objects.create(
        item=item, provider="binance", value=Decimal("90.5"), source_time=at, received_at=at
    )
    return item


def get(client: Client, path: str, **params: Any) -> tuple[int, Any]:
    response = client.get(f"/api/v1/udf/{path}", params)
    assert response["Content-Type"].startswith("application/json")
    return response.status_code, json.loads(response.content)


def test_config_names_the_resolutions_and_search(client: Client) -> None:
    status, body = get(client, "config")
    assert status == 200
    assert body["supported_resolutions"] == udf.SUPPORTED_RESOLUTIONS
    assert body["supports_search"] is True
    assert body["supports_group_request"] is False
    assert body["supports_time"] is True


def test_time_is_plain_unix_seconds(client: Client) -> None:
    before = int(time.time())
    response = client.get("/api/v1/udf/time")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert before <= int(response.content) <= int(time.time())


@pytest.mark.django_db
def test_history_answers_ok_bars_from_one_providers_candles(client: Client, btc: Item) -> None:
    status, body = get(
        client, "history", symbol="btc-usd", resolution="1", to=S0 + 300, **{"from": S0 + 120}
    )
    assert status == 200
    assert body == {
        "s": "ok",
        "t": [S0 + 120, S0 + 180, S0 + 240],
        "o": [102, 103, 104],
        "h": [102, 103, 104],
        "l": [102, 90.5, 104],
        "c": [102, 90.5, 104],
        "v": [1, 2, 1],
    }


@pytest.mark.django_db
def test_history_aggregates_where_no_candle_is_native(client: Client, btc: Item) -> None:
    _, fifteen = get(client, "history", symbol="BTC-USD", resolution="15", to=S0 + 3600,
                     **{"from": S0})  # fmt: skip
    assert fifteen == {"s": "ok", "t": [S0], "o": [100], "h": [109], "l": [90.5], "c": [109],
                       "v": [11]}  # fmt: skip
    _, four_hours = get(client, "history", symbol="BTC-USD", resolution="240", to=S0 + 86400,
                        **{"from": S0})  # fmt: skip
    assert four_hours == fifteen
    _, day = get(client, "history", symbol="BTC-USD", resolution="D", to=S0 + 86400,
                 **{"from": S0})  # fmt: skip
    assert day == fifteen


@pytest.mark.django_db
def test_countback_takes_precedence_over_from(client: Client, btc: Item) -> None:
    _, body = get(client, "history", symbol="BTC-USD", resolution="1", to=S0 + 600,
                  countback=2, **{"from": S0})  # fmt: skip
    assert body["t"] == [S0 + 480, S0 + 540]
    assert body["c"] == [108, 109]


@pytest.mark.django_db
def test_no_data_points_to_the_closest_earlier_bar(client: Client, btc: Item) -> None:
    day = 86400
    _, later = get(client, "history", symbol="BTC-USD", resolution="5", to=S0 + 2 * day,
                   **{"from": S0 + day})  # fmt: skip
    assert later == {"s": "no_data", "nextTime": S0 + 300}  # the 00:05 bar holds 00:09's rate
    _, before = get(client, "history", symbol="BTC-USD", resolution="60", to=S0,
                    **{"from": S0 - day})  # fmt: skip
    assert before == {"s": "no_data"}  # nothing earlier: the library stops asking


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"symbol": "DOGE-USD", "resolution": "1", "from": S0, "to": S0 + 60}, 404, None),
        ({"symbol": "BTC-USD", "resolution": "2", "from": S0, "to": S0 + 60}, 422, "resolution"),
        ({"symbol": "BTC-USD", "resolution": "1", "from": "x", "to": S0 + 60}, 422, "from"),
        ({"symbol": "BTC-USD", "resolution": "1", "from": S0, "to": "1e99"}, 422, "to"),
        ({"symbol": "BTC-USD", "resolution": "1", "from": S0, "to": S0}, 422, "from"),
        ({"symbol": "BTC-USD", "resolution": "1", "from": S0}, 422, "to"),
        ({"symbol": "BTC-USD", "resolution": "1", "to": S0 + 60, "countback": 0}, 422, "countback"),
        ({"symbol": "", "resolution": "1", "from": S0, "to": S0 + 60}, 422, "symbol"),
        ({"symbol": "BTC\x00-USD", "resolution": "1", "from": S0, "to": S0 + 60}, 422, "symbol"),
        ({"symbol": "BTCUSD", "resolution": "1", "from": S0, "to": S0 + 60}, 422, "symbol"),
    ],
)
def test_bad_input_is_a_4xx_both_readers_understand(
    client: Client, btc: Item, params: dict[str, Any], status: int, field: str | None
) -> None:
    got, body = get(client, "history", **params)
    assert got == status
    assert body["s"] == "error"
    assert body["errmsg"] == body["detail"]
    if field is not None:
        assert body["errors"][0]["field"] == field
        assert body["detail"].startswith(f"{field}: ")


@pytest.mark.django_db
def test_unknown_parameters_the_library_sends_are_ignored(client: Client, btc: Item) -> None:
    status, body = get(client, "history", symbol="BTC-USD", resolution="1", to=S0 + 60,
                       currencyCode="USD", firstDataRequest="true", **{"from": S0})  # fmt: skip
    assert (status, body["t"]) == (200, [S0])


@pytest.mark.django_db
def test_symbols_answers_the_symbol_info(client: Client, btc: Item) -> None:
    CurrentRate.objects.create(
        item=btc, provider="binance", value=Decimal("54000.5"), source_time=T0, checked_at=T0,
        received_at=T0,
    )  # fmt: skip
    status, info = get(client, "symbols", symbol="Kurs:btc-usd")
    assert status == 200
    assert info["name"] == info["ticker"] == "BTC-USD"
    assert info["session"] == "24x7"
    assert info["timezone"] == "Etc/UTC"
    assert (info["minmov"], info["pricescale"]) == (1, 1000)
    assert info["has_intraday"] is True
    assert info["supported_resolutions"] == udf.SUPPORTED_RESOLUTIONS
    status, missing = get(client, "symbols", symbol="NOPE-USD")
    assert status == 404
    assert missing["s"] == "error"


@pytest.mark.django_db
def test_search_finds_active_pairs_by_code_or_name(client: Client, btc: Item) -> None:
    Item.objects.filter(pk=btc.pk).update(name="Digital gold")
    Item.objects.filter(code="ETH-USD").update(is_active=False)
    status, hits = get(client, "search", query="GOLD", limit=5)
    assert status == 200
    assert hits == [
        {"symbol": "BTC-USD", "full_name": "Kurs:BTC-USD", "description": "Digital gold",
         "exchange": "Kurs", "ticker": "BTC-USD", "type": "crypto"}
    ]  # fmt: skip
    _, usd = get(client, "search", query="usd")
    assert "ETH-USD" not in [hit["symbol"] for hit in usd]
    assert "BTC-USD" in [hit["symbol"] for hit in usd]
    assert get(client, "search", limit=1000)[0] == 422
    assert get(client, "search", query="a\x00")[0] == 422


# The protocol's own history example (TradingView's UDF page, "Bars"): four one-minute bars.
DOC_T = [1386493512, 1386493572, 1386493632, 1386493692]
DOC_C = [42.1, 43.4, 44.3, 42.8]
DOC_O = [41.0, 42.9, 43.7, 44.5]
DOC_H = [43.0, 44.1, 44.8, 44.5]
DOC_L = [40.4, 42.1, 42.8, 42.3]


@pytest.mark.django_db
def test_the_protocols_documented_example_bar_for_bar(client: Client) -> None:
    """Rates that make the example's bars (open, high, low, close in each minute) answer its
    arrays; `t` is each bar's start (bars are aligned to the minute, the example's times are not)
    and `v` the quotes (4 each: a rate has no traded volume). Past the last bar, `no_data` points
    back to it, as the example's `{"s": "no_data", "nextTime": ...}`."""
    item = Item.objects.get_or_create(base="BTC", quote="USD")[0]
    for t, o, h, low, c in zip(DOC_T, DOC_O, DOC_H, DOC_L, DOC_C, strict=True):
        for offset, value in enumerate((o, h, low, c)):
            at = datetime.fromtimestamp(t + offset, tz=UTC)
            Rate.objects.create(
                item=item, provider="binance", value=Decimal(str(value)), source_time=at,
                received_at=at,
            )  # fmt: skip
    first, last = DOC_T[0] - DOC_T[0] % 60, DOC_T[-1] + 60
    status, body = get(client, "history", symbol="BTC-USD", resolution="1", to=last,
                       **{"from": first})  # fmt: skip
    assert status == 200
    assert body == {
        "s": "ok",
        "t": [t - t % 60 for t in DOC_T],
        "o": DOC_O, "h": DOC_H, "l": DOC_L, "c": DOC_C,
        "v": [4, 4, 4, 4],
    }  # fmt: skip
    _, later = get(client, "history", symbol="BTC-USD", resolution="1", to=last + 3600,
                   **{"from": last})  # fmt: skip
    assert later == {"s": "no_data", "nextTime": DOC_T[-1] - DOC_T[-1] % 60}
