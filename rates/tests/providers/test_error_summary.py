"""What a provider failure says: status, host and a short reason, never the upstream's markup.

The texts travel as they are to /providers, the 503 details of /rates and the dashboard, so each
failure the emulator can produce is asked for over real HTTP and WebSocket and its text checked.
"""

from __future__ import annotations

from collections.abc import Awaitable
from contextlib import aclosing

import httpx
import pytest

from rates.emulator import EmulatorServer
from rates.providers import Pair, Provider, ProviderError, ProviderHTTPError, ProviderMalformed
from rates.providers.base import MESSAGE_LIMIT, readable, summarise_error
from rates.tests.conftest_emulator import make_provider


def host_of(emulator: EmulatorServer) -> str:
    return httpx.URL(emulator.base_url).netloc.decode()


async def failure(call: Awaitable[object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await call
    return caught.value


async def first_streamed(provider: Provider, pair: Pair) -> object:
    async with aclosing(provider.stream([pair])) as quotes:
        return await anext(quotes)


@pytest.mark.parametrize("name", ["binance", "bybit", "coingecko", "cbr"])
async def test_a_provider_down_behind_an_html_page_is_summarised(
    name: str, emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider(name, emulator, emulator_client)
    response = await emulator_client.post(
        f"{emulator.base_url}/_control/{name}", json={"mode": "down"}
    )
    assert response.status_code == 200
    error = await failure(provider.fetch([Pair("BTC", "USD"), Pair("USD", "RUB")]))
    assert isinstance(error, ProviderHTTPError)
    assert error.status == 503
    assert str(error) == f"HTTP 503 from {host_of(emulator)}: Service Temporarily Unavailable"


async def test_a_refused_stream_upgrade_is_summarised(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("binance", emulator, emulator_client)
    emulator.set_fault("binance", "down", status=502)
    error = await failure(first_streamed(provider, Pair("BTC", "USDT")))
    assert isinstance(error, ProviderHTTPError)
    assert str(error) == (
        f"HTTP 502 from {host_of(emulator)} (WebSocket upgrade): Service Temporarily Unavailable"
    )


async def test_an_html_page_served_as_json_leaves_no_markup(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("coingecko", emulator, emulator_client)
    emulator.set_fault("coingecko", "garbage")
    error = await failure(provider.fetch([Pair("BTC", "USD")]))
    assert isinstance(error, ProviderMalformed)
    text = str(error)
    assert "not JSON" in text
    assert "Scheduled maintenance" in text
    assert "<" not in text


async def test_an_exchange_json_error_keeps_its_code_and_message(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("binance", "rate_limited", retry_after=2)
    provider = make_provider("binance", emulator, emulator_client)
    error = await failure(provider.fetch([Pair("BTC", "USDT")]))
    assert isinstance(error, ProviderHTTPError)
    text = str(error)
    assert text.startswith(f"HTTP 429 from {host_of(emulator)}: rate limited, retry after 2s: ")
    assert "-1003" in text


def test_a_status_without_a_body_is_named_by_its_phrase() -> None:
    assert summarise_error(502, "https://api.binance.com/api/v3/ticker/price?symbols=x") == (
        "HTTP 502 from api.binance.com: Bad Gateway"
    )
    assert (
        summarise_error(599, "http://10.0.0.1:8080/x", "  ") == "HTTP 599 from 10.0.0.1:8080: error"
    )
    # A page whose title only repeats the status says no more than the phrase.
    assert summarise_error(504, "http://cbr.test/", "<title>504</title>") == (
        "HTTP 504 from cbr.test: Gateway Timeout"
    )


def test_any_failure_text_is_plain_and_bounded() -> None:
    page = "<html><body>" + "<p>Bad &lt;b&gt;gateway&lt;/b&gt;</p>\n" * 200 + "</body></html>"
    error = ProviderError(f"cannot parse {page}")
    assert "<" not in str(error)
    assert len(str(error)) <= MESSAGE_LIMIT
    assert str(error).startswith("cannot parse Bad gateway Bad gateway")
    # What a snippet cut in the middle of a tag leaves is no tag either.
    assert readable("body is not JSON: '<html><bo") == "body is not JSON: '"
    assert readable("<!DOCTYPE html><!-- x --><p>down</p> <") == "down"
    # A comparison is words, not markup.
    assert readable("price < 0 or > 1e9") == "price < 0 or > 1e9"
