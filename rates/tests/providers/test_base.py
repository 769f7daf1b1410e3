from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from rates.providers import (
    BinanceProvider,
    Pair,
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderMalformed,
    ProviderRateLimited,
)
from rates.providers.base import decode_json, from_millis, parse_retry_after, to_decimal


def test_it_names_a_pair_by_its_kurs_code() -> None:
    assert Pair("BTC", "USD").code == "BTC-USD"
    assert Pair.parse(" btc-rub ") == Pair("BTC", "RUB")
    with pytest.raises(ValueError, match="BASE-QUOTE"):
        Pair.parse("BTCUSD")


def test_it_parses_prices_exactly_and_unparsable_ones_as_nan() -> None:
    assert to_decimal("0.07946600") == Decimal("0.07946600")
    assert to_decimal(Decimal("67187.3358936566")) == Decimal("67187.3358936566")
    assert to_decimal(5) == Decimal(5)
    for bad in ("", "abc", None, True, 1.5, [1]):
        assert to_decimal(bad).is_nan()


def test_it_keeps_every_digit_of_json_numbers() -> None:
    body = decode_json(b'{"usd": 67187.3358936566123456789}', what="body")
    assert body["usd"] == Decimal("67187.3358936566123456789")
    with pytest.raises(ProviderMalformed, match="not JSON"):
        decode_json(b"<html>", what="body")


def test_it_reads_retry_after_as_seconds_or_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = datetime.now(UTC) + timedelta(seconds=30)
    in_date = parse_retry_after(when.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert in_date is not None
    assert 25 <= in_date <= 30


def test_it_converts_exchange_milliseconds_to_aware_utc() -> None:
    assert from_millis(1672515782136) == datetime(2022, 12, 31, 19, 43, 2, 136000, tzinfo=UTC)
    assert from_millis("x") is None
    assert from_millis(None) is None


def test_every_failure_is_a_provider_error_with_a_short_reason() -> None:
    limited = ProviderRateLimited("HTTP 429", retry_after=2.0)
    assert isinstance(limited, ProviderHTTPError)
    assert isinstance(limited, ProviderError)
    assert (limited.status, limited.retry_after, str(limited)) == (429, 2.0, "HTTP 429")


@pytest.fixture
async def resetting_server() -> AsyncIterator[int]:
    """A loopback port whose server resets each connection once the request starts arriving."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        # SO_LINGER 0: the close sends RST, which httpx reports as a ReadError with no text.
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_failure_without_text_is_named_by_its_kind(resetting_server: int) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        provider = BinanceProvider(
            rest_url=f"http://127.0.0.1:{resetting_server}", ws_url=None, client=client
        )
        with pytest.raises(ProviderConnectionError) as failure:
            await provider.fetch([Pair("BTC", "USDT")])
    assert failure.match(r"^cannot reach /api/v3/ticker/\w+: ReadError$")


async def test_a_provider_without_a_stream_says_so() -> None:
    from rates.providers import CBRProvider

    async with httpx.AsyncClient() as client:
        provider = CBRProvider(rest_url="http://127.0.0.1:9", client=client)
        with pytest.raises(ProviderError, match="no WebSocket stream"):
            provider.stream([Pair("USD", "RUB")])


@pytest.mark.parametrize(
    ("pair", "proxy", "expected"),
    [
        (Pair("BTC", "USD"), "USDT", ("BTC", "USDT", True)),
        (Pair("BTC", "USDT"), "USDT", ("BTC", "USDT", False)),
        (Pair("USDTTRC", "USD"), "USDT", None),  # USDT-USD through the USDT proxy is an identity
        (Pair("USDTERC", "USDT"), "USDT", None),
        (Pair("ETH", "BTC"), "USDT", ("ETH", "BTC", False)),
        (Pair("BTC", "USD"), "", None),  # no proxy: Binance has no USD market
        (Pair("BTC", "RUB"), "USDT", None),  # delisted
        (Pair("AUD", "CAD"), "USDT", None),  # fiat pairs are not crypto markets
    ],
)
def test_it_maps_kurs_pairs_to_exchange_markets(
    pair: Pair, proxy: str, expected: tuple[str, str, bool] | None
) -> None:
    provider = BinanceProvider(
        rest_url="http://127.0.0.1:9",
        client=httpx.AsyncClient(),
        aliases={"USDTTRC": "USDT", "USDTERC": "USDT"},
        usd_proxy=proxy,
    )
    assert provider.market(pair, frozenset({"USDT", "BTC"})) == expected
