from __future__ import annotations

from typing import Any

import httpx
import pytest

from rates.providers import (
    BinanceProvider,
    CBRProvider,
    CoinGeckoProvider,
    Pair,
    build_providers,
)


async def test_it_builds_providers_from_settings_in_priority_order(settings: Any) -> None:
    settings.KURS_PROVIDER_URLS = {
        "binance": {"rest": "http://127.0.0.1:8900/binance", "ws": "ws://127.0.0.1:8900/binance"},
        "coingecko": {"rest": "http://127.0.0.1:8900/coingecko", "ws": None},
        "cbr": {"rest": "http://127.0.0.1:8900/cbr", "ws": None},
    }
    settings.KURS_COINGECKO_API_KEY = "demo-key"
    settings.KURS_USD_PROXY = ""
    settings.KURS_ASSET_ALIASES = {"USDTTRC": "USDT"}
    async with httpx.AsyncClient() as client:
        cbr, binance, coingecko = build_providers(["cbr", "binance", "coingecko"], client=client)
    assert isinstance(cbr, CBRProvider)
    assert isinstance(binance, BinanceProvider)
    assert isinstance(coingecko, CoinGeckoProvider)
    assert binance.rest_url == "http://127.0.0.1:8900/binance"
    assert binance.ws_url == "ws://127.0.0.1:8900/binance"
    assert not binance.supports(Pair("BTC", "USD"))  # empty KURS_USD_PROXY
    assert coingecko.headers() == {"x-cg-demo-api-key": "demo-key"}
    assert coingecko.supports(Pair("USDTTRC", "RUB"))


def test_it_refuses_an_unknown_provider() -> None:
    with pytest.raises(ValueError, match="unknown provider 'kraken'"):
        build_providers(["kraken"], client=httpx.AsyncClient())
