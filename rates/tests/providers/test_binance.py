from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import parse_qs

import httpx
import pytest

from rates.emulator import EmulatorServer, run_emulator_server
from rates.providers import (
    BinanceProvider,
    Pair,
    ProviderConnectionError,
    ProviderHTTPError,
    ProviderMalformed,
    ProviderRateLimited,
    ProviderTimeout,
)
from rates.providers.binance import STREAMS_PER_REQUEST, parse_rest, parse_stream_message
from rates.tests.conftest_emulator import make_provider
from rates.tests.providers.helpers import next_quote
from tests.services import free_port

PAIRS = [Pair("BTC", "USD"), Pair("ETH", "USDT"), Pair("USDTTRC", "RUB"), Pair("BTC", "RUB")]

# Verbatim from shared/reference/provider-formats.md (Binance REST and WS sections).
SAMPLE_PRICES = (
    '[{"symbol": "LTCBTC", "price": "4.00000200"}, {"symbol": "ETHBTC", "price": "0.07946600"}]'
)
SAMPLE_BOOK = (
    '[{"symbol": "LTCBTC", "bidPrice": "4.00000000", "bidQty": "431.00000000",'
    ' "askPrice": "4.00000200", "askQty": "9.00000000"}]'
)
SAMPLE_FRAME = (
    '{"stream":"btcusdt@miniTicker","data":{"e":"24hrMiniTicker","E":1672515782136,"s":"BTCUSDT",'
    '"c":"0.0025","o":"0.0010","h":"0.0025","l":"0.0010","v":"10000","q":"18"}}'
)


def binance(emulator: EmulatorServer, client: httpx.AsyncClient, **kw: object) -> BinanceProvider:
    provider = make_provider("binance", emulator, client, **kw)
    assert isinstance(provider, BinanceProvider)
    return provider


def test_it_parses_the_documented_rest_payloads() -> None:
    received = datetime(2024, 1, 1, tzinfo=UTC)
    wanted = {"LTCBTC": [(Pair("LTC", "BTC"), False)], "ETHBTC": [(Pair("ETH", "BTC"), False)]}
    quotes = parse_rest(json.loads(SAMPLE_PRICES), json.loads(SAMPLE_BOOK), wanted, received)
    ltc, eth = quotes
    assert (ltc.pair, ltc.value, ltc.bid, ltc.ask) == (
        "LTC-BTC",
        Decimal("4.00000200"),
        Decimal("4.00000000"),
        Decimal("4.00000200"),
    )
    assert (eth.value, eth.bid, eth.source_time) == (Decimal("0.07946600"), None, received)


def test_it_parses_the_documented_combined_stream_frame() -> None:
    wanted = {"BTCUSDT": [(Pair("BTC", "USD"), True), (Pair("BTC", "USDT"), False)]}
    usd, usdt = parse_stream_message(SAMPLE_FRAME, wanted) or []
    assert usd.value == Decimal("0.0025")
    assert usd.proxied
    assert not usdt.proxied
    assert usd.source_time == datetime(2022, 12, 31, 19, 43, 2, 136000, tzinfo=UTC)


def test_it_skips_acks_and_ends_on_server_shutdown() -> None:
    assert parse_stream_message('{"result": null, "id": 1}', {}) == []
    shutdown = '{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}'
    assert parse_stream_message(shutdown, {}) is None


@pytest.mark.parametrize(
    "frame", ['{"stream":"btcusdt@ticker","data":{"e":"24hrT', '{"stream":"x","data":"oops"}', "[]"]
)
def test_it_rejects_torn_or_misshapen_frames(frame: str) -> None:
    with pytest.raises(ProviderMalformed):
        parse_stream_message(frame, {})


async def test_it_quotes_usd_pairs_from_the_usdt_market_and_skips_rub(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = binance(emulator, emulator_client)
    assert not provider.supports(Pair("BTC", "RUB"))
    assert not provider.supports(Pair("USDTTRC", "USD"))
    quotes = {q.pair: q for q in await provider.fetch(PAIRS)}
    assert set(quotes) == {"BTC-USD", "ETH-USDT"}
    book = emulator.market.books["binance"]
    btc = quotes["BTC-USD"]
    assert btc.value == book.prices["BTCUSDT"]
    assert btc.proxied
    assert btc.bid is not None
    assert btc.ask is not None
    assert btc.bid < btc.value < btc.ask
    assert quotes["ETH-USDT"].value == book.prices["ETHUSDT"]
    assert not quotes["ETH-USDT"].proxied
    assert btc.source_time.tzinfo is UTC


async def test_it_sends_the_symbols_array_without_spaces(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    await binance(emulator, emulator_client).fetch(PAIRS)
    logged = [r for r in emulator.market.requests if r.provider == "binance"]
    assert {r.path for r in logged} == {"/api/v3/ticker/price", "/api/v3/ticker/bookTicker"}
    for request in logged:
        raw = request.query
        symbols = parse_qs(raw)["symbols"][0]
        assert symbols == '["BTCUSDT","ETHUSDT"]'
        assert " " not in symbols
        assert "+" not in raw
        assert "%20" not in raw


async def test_it_sends_nothing_without_a_supported_pair(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = binance(emulator, emulator_client, usd_proxy="")
    assert await provider.fetch([Pair("BTC", "USD"), Pair("BTC", "RUB")]) == []
    assert not emulator.market.requests


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ({"mode": "down"}, ProviderHTTPError, 503),
        ({"mode": "down", "status": 500}, ProviderHTTPError, 500),
        ({"mode": "rate_limited", "retry_after": 2}, ProviderRateLimited, 429),
        ({"mode": "rate_limited", "status": 418, "retry_after": 120}, ProviderRateLimited, 418),
        ({"mode": "garbage"}, ProviderMalformed, None),
        ({"mode": "garbage", "variant": "shape"}, ProviderMalformed, None),
    ],
)
async def test_it_turns_each_fault_into_its_provider_error(
    emulator: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    fault: dict[str, object],
    error: type[Exception],
    status: int | None,
) -> None:
    response = await emulator_client.post(f"{emulator.base_url}/_control/binance", json=fault)
    assert response.status_code == 200
    with pytest.raises(error) as caught:
        await binance(emulator, emulator_client).fetch(PAIRS)
    if status is not None:
        assert getattr(caught.value, "status", None) == status
    if isinstance(caught.value, ProviderRateLimited):
        assert caught.value.retry_after == fault["retry_after"]
        assert "-1003" in str(caught.value)


async def test_it_reports_a_rate_limit_without_retry_after(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("binance", "rate_limited", retry_after=None)
    with pytest.raises(ProviderRateLimited) as caught:
        await binance(emulator, emulator_client).fetch(PAIRS)
    assert caught.value.retry_after is None


async def test_it_times_out_on_a_slow_exchange(emulator: EmulatorServer) -> None:
    emulator.set_fault("binance", "slow", delay=1)
    async with httpx.AsyncClient(timeout=0.1) as client:
        with pytest.raises(ProviderTimeout):
            await binance(emulator, client).fetch(PAIRS)


async def test_it_reports_a_refused_connection(emulator_client: httpx.AsyncClient) -> None:
    provider = BinanceProvider(
        rest_url=f"http://127.0.0.1:{free_port()}", ws_url=None, client=emulator_client
    )
    with pytest.raises(ProviderConnectionError, match="cannot reach"):
        await provider.fetch([Pair("BTC", "USDT")])


async def test_it_passes_absurd_prices_on_for_validation_to_reject(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("binance", "absurd", factor="-1")
    quotes = await binance(emulator, emulator_client).fetch([Pair("BTC", "USDT")])
    assert quotes[0].value == -emulator.market.books["binance"].prices["BTCUSDT"]


async def test_it_names_binance_errors_from_their_body(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = binance(emulator, emulator_client)
    response = await emulator_client.get(
        f"{emulator.rest_url('binance')}/api/v3/ticker/price", params={"symbol": "XYZUSDT"}
    )
    assert response.status_code == 400
    assert provider.error_detail(response) == ": -1121 Invalid symbol."


async def test_its_stream_yields_quotes_and_a_price_set_on_the_exchange(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = binance(emulator, emulator_client)
    async with aclosing(provider.stream(PAIRS)) as quotes:
        first = await next_quote(quotes)
        assert first.pair in {"BTC-USD", "ETH-USDT"}
        response = await emulator_client.post(
            f"{emulator.base_url}/_control/binance/price",
            json={"symbol": "BTCUSDT", "price": "91234.5"},
        )
        changed_ms = response.json()["changed_at_ms"]
        quote = await next_quote(quotes, lambda q: q.value == Decimal("91234.5"))
    assert quote.pair == "BTC-USD"
    assert quote.proxied
    assert quote.provider == "binance"
    assert quote.source_time == datetime.fromtimestamp(changed_ms / 1000, tz=UTC)
    assert quote.bid is not None
    assert quote.ask is not None
    streams = [r.query for r in emulator.market.requests if r.method == "WS"]
    assert streams == ["streams=btcusdt@ticker/ethusdt@ticker"]


async def test_its_stream_raises_malformed_on_a_torn_frame(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = binance(emulator, emulator_client)
    async with aclosing(provider.stream([Pair("BTC", "USDT")])) as quotes:
        await next_quote(quotes)
        emulator.set_fault("binance", "garbage")
        emulator.market.books["binance"].set("BTCUSDT", Decimal("90001"))
        with pytest.raises(ProviderMalformed, match="not JSON"):
            await next_quote(quotes)


async def test_its_stream_raises_when_the_exchange_drops_it(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = binance(emulator, emulator_client)
    async with aclosing(provider.stream([Pair("BTC", "USDT")])) as quotes:
        await next_quote(quotes)
        emulator.set_fault("binance", "drop_stream")
        with pytest.raises(ProviderConnectionError, match="1011"):
            await next_quote(quotes)


async def test_its_stream_upgrade_refused_while_down(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("binance", "down")
    with pytest.raises(ProviderHTTPError) as caught:
        await next_quote(binance(emulator, emulator_client).stream(PAIRS))
    assert caught.value.status == 503
    emulator.set_fault("binance", "rate_limited", retry_after=5)
    with pytest.raises(ProviderRateLimited) as limited:
        await next_quote(binance(emulator, emulator_client).stream(PAIRS))
    assert limited.value.retry_after == 5


async def test_its_stream_ends_before_the_connection_lifetime(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    assert BinanceProvider.connection_lifetime is not None
    assert BinanceProvider.connection_lifetime < 24 * 3600
    provider = binance(emulator, emulator_client, max_connection_age=0.3)
    received = []
    async with aclosing(provider.stream([Pair("BTC", "USDT")])) as quotes:
        async with asyncio.timeout(3):
            received = [quote async for quote in quotes]
    assert len(received) == 1  # the opening ticker, then a clean end at the deadline


async def test_websockets_answers_server_pings_for_us(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    """Binance pings every 20 s and drops clients that do not pong: websockets pongs itself."""
    from websockets.asyncio.client import connect

    async with connect(f"{emulator.ws_url('binance')}/stream?streams=btcusdt@ticker") as ws:
        pong_waiter = await ws.ping(b"kurs")
        await asyncio.wait_for(pong_waiter, 2)  # the round trip works both ways
        assert ws.ping_interval == 20


async def test_an_unlisted_symbol_does_not_cost_the_other_pairs_their_quotes(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("binance", emulator, emulator_client)
    pairs = [Pair("BTC", "USD"), Pair("NOPE", "USD")]
    quotes = await provider.fetch(pairs)
    assert [quote.pair for quote in quotes] == ["BTC-USD"]
    # Next round: the unlisted symbol is left out, so one request per endpoint succeeds.
    emulator.market.requests.clear()
    quotes = await provider.fetch(pairs)
    assert [quote.pair for quote in quotes] == ["BTC-USD"]
    asked = [r for r in emulator.market.requests if r.path.endswith("ticker/price")]
    assert len(asked) == 1
    assert parse_qs(asked[0].query)["symbols"] == ['["BTCUSDT"]']


async def test_its_stream_asks_for_a_thousand_pairs_in_subscribe_messages(
    emulator_client: httpx.AsyncClient,
) -> None:
    # A 1,000-stream URL would be a 19 KB request line: servers refuse lines over 8 KB.
    # A subscribed stream's first ticker comes with the next tick, as on Binance (1 s).
    async with run_emulator_server(tick=0.5, synthetic_pairs=1000) as emulator:
        provider = binance(emulator, emulator_client)
        pairs = [Pair(f"SYN{n:04d}", "USDT") for n in range(1, 1001)]
        seen: set[str] = set()
        async with aclosing(provider.stream(pairs)) as quotes:
            while len(seen) < len(pairs):
                seen.add((await next_quote(quotes)).pair)
        opened = [r.query for r in emulator.market.requests if r.method == "WS"]
    assert len(opened) == 1
    assert opened[0].count("@ticker") == STREAMS_PER_REQUEST
    assert len(opened[0]) < 8192
