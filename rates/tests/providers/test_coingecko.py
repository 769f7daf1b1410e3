from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest

from rates.emulator import EmulatorServer
from rates.providers import (
    CoinGeckoProvider,
    Pair,
    ProviderHTTPError,
    ProviderMalformed,
    ProviderRateLimited,
)
from rates.providers.base import decode_json
from rates.providers.coingecko import parse_simple_price
from rates.tests.conftest_emulator import make_provider

# Verbatim from shared/reference/provider-formats.md section 4 (prices are JSON numbers).
SAMPLE = b"""{"bitcoin": {"usd": 67187.3358936566, "usd_market_cap": 1317802988326.25,
  "usd_24h_vol": 31260929299.5248, "usd_24h_change": 3.63727894677354,
  "last_updated_at": 1711356300}}"""
SAMPLE_429 = (
    b'{"status":{"error_code":429,"error_message":"You\'ve exceeded the Rate Limit. Please visit '
    b"https://www.coingecko.com/en/api/pricing to subscribe to our API plans for higher rate "
    b'limits."}}'
)
PAIRS = [Pair("BTC", "USD"), Pair("USDTTRC", "RUB"), Pair("ETH", "RUB"), Pair("AUD", "CAD")]


def coingecko(
    emulator: EmulatorServer, client: httpx.AsyncClient, **kw: object
) -> CoinGeckoProvider:
    provider = make_provider("coingecko", emulator, client, **kw)
    assert isinstance(provider, CoinGeckoProvider)
    return provider


def test_it_parses_the_documented_answer_without_float_rounding() -> None:
    wanted = {("bitcoin", "usd"): [Pair("BTC", "USD")], ("ethereum", "usd"): [Pair("ETH", "USD")]}
    (quote,) = parse_simple_price(decode_json(SAMPLE, what="body"), wanted, datetime.now(UTC))
    assert quote.value == Decimal("67187.3358936566")
    assert str(quote.value) == "67187.3358936566"
    assert quote.source_time == datetime(2024, 3, 25, 8, 45, tzinfo=UTC)
    assert not quote.proxied


def test_it_treats_an_error_status_body_as_an_error() -> None:
    with pytest.raises(ProviderHTTPError, match="429"):
        parse_simple_price(decode_json(SAMPLE_429, what="body"), {}, datetime.now(UTC))


async def test_it_quotes_true_usd_and_rub_with_aliases(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = coingecko(emulator, emulator_client)
    assert not provider.supports(Pair("BTC", "USDT"))
    assert not provider.supports(Pair("AUD", "CAD"))
    quotes = {q.pair: q for q in await provider.fetch(PAIRS)}
    book = emulator.market.books["coingecko"]
    assert quotes["BTC-USD"].value == book.prices["bitcoin.usd"]
    assert quotes["USDTTRC-RUB"].value == book.prices["tether.rub"]
    assert quotes["ETH-RUB"].value == book.prices["ethereum.rub"]
    assert set(quotes) == {"BTC-USD", "USDTTRC-RUB", "ETH-RUB"}
    assert not any(q.proxied for q in quotes.values())
    changed = book.changed_ms["bitcoin.usd"] // 1000
    assert quotes["BTC-USD"].source_time == datetime.fromtimestamp(changed, tz=UTC)
    (request,) = emulator.market.requests
    assert request.query == (
        "ids=bitcoin%2Cethereum%2Ctether&vs_currencies=rub%2Cusd"
        "&include_last_updated_at=true&precision=full"
    )


def test_it_sends_the_key_header_matching_the_host() -> None:
    client = httpx.AsyncClient()
    demo = CoinGeckoProvider(rest_url="https://api.coingecko.com", client=client, api_key="k")
    pro = CoinGeckoProvider(rest_url="https://pro-api.coingecko.com", client=client, api_key="k")
    keyless = CoinGeckoProvider(rest_url="https://api.coingecko.com", client=client)
    assert demo.headers() == {"x-cg-demo-api-key": "k"}
    assert pro.headers() == {"x-cg-pro-api-key": "k"}
    assert keyless.headers() == {}


async def test_it_honours_retry_after_on_429(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("coingecko", "rate_limited", retry_after=119)
    with pytest.raises(ProviderRateLimited, match="exceeded the Rate Limit") as caught:
        await coingecko(emulator, emulator_client).fetch(PAIRS)
    assert caught.value.retry_after == 119


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ({"mode": "down", "status": 500}, ProviderHTTPError),
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
    await emulator_client.post(f"{emulator.base_url}/_control/coingecko", json=fault)
    with pytest.raises(error):
        await coingecko(emulator, emulator_client).fetch(PAIRS)
