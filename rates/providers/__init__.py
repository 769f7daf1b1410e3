"""Exchange providers: one module per exchange, all behind :class:`rates.providers.base.Provider`.

Nothing here needs Django until :func:`build_providers`, which reads the settings lazily.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
from django.conf import settings

from rates.providers.base import (
    Listing,
    Pair,
    Provider,
    ProviderConnectionError,
    ProviderError,
    ProviderHTTPError,
    ProviderMalformed,
    ProviderRateLimited,
    ProviderTimeout,
    Quote,
)
from rates.providers.binance import BinanceProvider
from rates.providers.bybit import BybitProvider
from rates.providers.cbr import CBRProvider
from rates.providers.coingecko import CoinGeckoProvider

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    cls.name: cls for cls in (BinanceProvider, BybitProvider, CoinGeckoProvider, CBRProvider)
}

__all__ = [
    "PROVIDER_CLASSES",
    "BinanceProvider",
    "BybitProvider",
    "CBRProvider",
    "CoinGeckoProvider",
    "Listing",
    "Pair",
    "Provider",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderHTTPError",
    "ProviderMalformed",
    "ProviderRateLimited",
    "ProviderTimeout",
    "Quote",
    "build_providers",
]


def build_providers(names: Iterable[str], *, client: httpx.AsyncClient) -> list[Provider]:
    """Providers named in ``names`` (priority order kept), configured from Django settings."""
    providers: list[Provider] = []
    for name in names:
        cls = PROVIDER_CLASSES.get(name)
        if cls is None:
            raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDER_CLASSES)})")
        urls = settings.KURS_PROVIDER_URLS[name]
        options: dict[str, Any] = {
            "rest_url": urls["rest"],
            "ws_url": urls.get("ws"),
            "client": client,
            "aliases": settings.KURS_ASSET_ALIASES,
            "usd_proxy": settings.KURS_USD_PROXY,
        }
        if cls is CoinGeckoProvider:
            providers.append(CoinGeckoProvider(api_key=settings.KURS_COINGECKO_API_KEY, **options))
        else:
            providers.append(cls(**options))
    return providers
