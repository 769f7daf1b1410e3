from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest

from rates.emulator import EmulatorServer
from rates.providers import (
    BybitProvider,
    Pair,
    ProviderConnectionError,
    ProviderHTTPError,
    ProviderMalformed,
    ProviderRateLimited,
)
from rates.providers.bybit import TickerState, parse_rest, raise_for_ret_code
from rates.tests.conftest_emulator import make_provider
from rates.tests.providers.helpers import next_quote

PAIRS = [Pair("BTC", "USD"), Pair("ETH", "USDT"), Pair("USDTERC", "RUB")]

# Verbatim from shared/reference/provider-formats.md section 5a (trimmed to the fields used).
SAMPLE_REST = """{"retCode": 0, "retMsg": "OK", "result": {"category": "spot", "list": [
  {"symbol": "BTCUSDT", "bid1Price": "20517.96", "bid1Size": "2", "ask1Price": "20527.77",
   "ask1Size": "1.862172", "lastPrice": "20533.13", "prevPrice24h": "20393.48",
   "price24hPcnt": "0.0068", "highPrice24h": "21128.12", "lowPrice24h": "20318.89",
   "turnover24h": "243765620.65899866", "volume24h": "11801.27771",
   "usdIndexPrice": "20784.12009279"}]}, "retExtInfo": {}, "time": 1673859087947}"""
SAMPLE_WS = """{"topic": "tickers.BTCUSDT", "ts": 1673853746003, "type": "snapshot",
  "cs": 2588407389, "data": {"symbol": "BTCUSDT", "lastPrice": "21109.77",
  "highPrice24h": "21426.99", "lowPrice24h": "20575", "prevPrice24h": "20704.93",
  "volume24h": "6780.866843", "turnover24h": "141946527.22907118", "price24hPcnt": "0.0196",
  "usdIndexPrice": "21120.2400136"}}"""
SAMPLE_PONG = (
    '{"success": true, "ret_msg": "pong", "conn_id": "0970e817-426e-429a-a679-ff7f55e0b16a",'
    ' "op": "ping"}'
)
WANTED = {"BTCUSDT": [(Pair("BTC", "USD"), True)]}


def bybit(emulator: EmulatorServer, client: httpx.AsyncClient) -> BybitProvider:
    provider = make_provider("bybit", emulator, client)
    assert isinstance(provider, BybitProvider)
    return provider


def test_it_parses_the_documented_tickers_answer() -> None:
    (quote,) = parse_rest(json.loads(SAMPLE_REST), WANTED)
    assert quote.value == Decimal("20533.13")
    assert quote.bid == Decimal("20517.96")
    assert quote.ask == Decimal("20527.77")
    assert quote.proxied
    assert quote.source_time == datetime(2023, 1, 16, 8, 51, 27, 947000, tzinfo=UTC)


def test_it_parses_snapshots_and_merges_deltas() -> None:
    state = TickerState(WANTED)
    assert state.feed(SAMPLE_PONG) == []
    (snapshot,) = state.feed(SAMPLE_WS)
    assert snapshot.value == Decimal("21109.77")
    assert snapshot.bid is None
    assert snapshot.source_time == datetime(2023, 1, 16, 7, 22, 26, 3000, tzinfo=UTC)
    delta = (
        '{"topic": "tickers.BTCUSDT", "ts": 1673853747003, "type": "delta",'
        ' "data": {"symbol": "BTCUSDT", "volume24h": "1"}}'
    )
    (merged,) = state.feed(delta)
    assert merged.value == Decimal("21109.77")
    assert merged.source_time > snapshot.source_time


def test_it_waits_for_a_snapshot_before_quoting_a_delta() -> None:
    delta = '{"topic": "tickers.BTCUSDT", "ts": 1, "type": "delta", "data": {"symbol": "BTCUSDT"}}'
    assert TickerState(WANTED).feed(delta) == []


@pytest.mark.parametrize("frame", ['{"topic": "tickers.BTCUSDT", "ts": 1, "da', '{"foo": 1}'])
def test_it_rejects_torn_or_misshapen_frames(frame: str) -> None:
    with pytest.raises(ProviderMalformed):
        TickerState(WANTED).feed(frame)


async def test_it_quotes_from_one_request_with_exchange_time(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = bybit(emulator, emulator_client)
    assert not provider.supports(Pair("USDTERC", "RUB"))
    quotes = {q.pair: q for q in await provider.fetch(PAIRS)}
    assert set(quotes) == {"BTC-USD", "ETH-USDT"}
    book = emulator.market.books["bybit"]
    assert quotes["BTC-USD"].value == book.prices["BTCUSDT"]
    assert quotes["BTC-USD"].proxied
    assert quotes["ETH-USDT"].value == book.prices["ETHUSDT"]
    (request,) = emulator.market.requests
    assert (request.path, request.query) == ("/v5/market/tickers", "category=spot")


async def test_it_asks_for_a_single_symbol_by_name(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    await bybit(emulator, emulator_client).fetch([Pair("BTC", "USDT")])
    assert emulator.market.requests[0].query == "category=spot&symbol=BTCUSDT"


async def test_it_reports_a_body_rate_limit_with_its_reset_time(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("bybit", "rate_limited", retry_after=3)
    with pytest.raises(ProviderRateLimited, match="10006") as caught:
        await bybit(emulator, emulator_client).fetch(PAIRS)
    assert caught.value.retry_after is not None
    assert 1 < caught.value.retry_after <= 3


async def test_it_backs_off_ten_minutes_after_an_ip_ban(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("bybit", "rate_limited", status=403)
    with pytest.raises(ProviderRateLimited) as caught:
        await bybit(emulator, emulator_client).fetch(PAIRS)
    assert caught.value.status == 403
    assert caught.value.retry_after == 600


async def test_one_symbol_it_does_not_list_is_no_quote_not_an_error(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    provider = bybit(emulator, emulator_client)
    assert await provider.fetch([Pair("XYZ", "USDT")]) == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "bybit does not list XYZUSDT; left out for an hour"
    ]
    # Left out for a while: the next poll asks nothing and logs nothing.
    emulator.market.requests.clear()
    caplog.clear()
    assert await provider.fetch([Pair("XYZ", "USDT")]) == []
    assert list(emulator.market.requests) == []
    assert caplog.records == []


def test_it_reports_any_other_ret_code_error() -> None:
    response = httpx.Response(200, request=httpx.Request("GET", "http://bybit.test/"))
    body = {"retCode": 10016, "retMsg": "Server error", "result": {}, "time": 1}
    with pytest.raises(ProviderHTTPError, match="retCode 10016 Server error"):
        raise_for_ret_code(body, response)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"mode": "down"}, ProviderHTTPError),
        ({"mode": "garbage"}, ProviderMalformed),
        ({"mode": "garbage", "variant": "shape"}, ProviderMalformed),
    ],
)
async def test_it_turns_each_fault_into_its_provider_error(
    emulator: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    fault: dict[str, object],
    error: type[Exception],
) -> None:
    await emulator_client.post(f"{emulator.base_url}/_control/bybit", json=fault)
    with pytest.raises(error):
        await bybit(emulator, emulator_client).fetch(PAIRS)


async def test_its_stream_subscribes_and_yields_a_set_price(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = bybit(emulator, emulator_client)
    async with aclosing(provider.stream(PAIRS)) as quotes:
        await next_quote(quotes)
        response = await emulator_client.post(
            f"{emulator.base_url}/_control/bybit/price",
            json={"symbol": "ETHUSDT", "price": "3210.55"},
        )
        changed_ms = response.json()["changed_at_ms"]
        quote = await next_quote(quotes, lambda q: q.value == Decimal("3210.55"))
    assert quote.pair == "ETH-USDT"
    assert not quote.proxied
    assert quote.source_time == datetime.fromtimestamp(changed_ms / 1000, tz=UTC)


async def test_its_stream_raises_malformed_on_a_misshapen_frame(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = bybit(emulator, emulator_client)
    async with aclosing(provider.stream([Pair("BTC", "USDT")])) as quotes:
        await next_quote(quotes)
        emulator.set_fault("bybit", "garbage", variant="shape")
        emulator.market.books["bybit"].set("BTCUSDT", Decimal("90001"))
        with pytest.raises(ProviderMalformed):
            await next_quote(quotes)


async def test_its_stream_raises_when_dropped(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = bybit(emulator, emulator_client)
    async with aclosing(provider.stream([Pair("BTC", "USDT")])) as quotes:
        await next_quote(quotes)
        emulator.set_fault("bybit", "drop_stream")
        with pytest.raises(ProviderConnectionError):
            await next_quote(quotes)


async def test_its_heartbeat_is_answered(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client pings with {"op": "ping"}; the pong is not mistaken for a ticker."""
    monkeypatch.setattr("rates.providers.bybit.HEARTBEAT_SECONDS", 0.01)
    provider = bybit(emulator, emulator_client)
    async with aclosing(provider.stream([Pair("BTC", "USDT")])) as quotes:
        await next_quote(quotes)
        await asyncio.wait_for(emulator.app.pinged["bybit"].wait(), 3)
        emulator.market.books["bybit"].set("BTCUSDT", Decimal("90002"))
        quote = await next_quote(quotes)
    assert quote.value == Decimal("90002")
