"""Reusable fixtures: an in-process exchange emulator on a free loopback port, and providers
pointed at it. Import them into a conftest.py::

    from rates.tests.conftest_emulator import emulator, emulator_client  # noqa: F401

and build providers with :func:`make_provider`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from rates.emulator import EmulatorServer, run_emulator_server
from rates.providers import PROVIDER_CLASSES, CoinGeckoProvider, Provider

ALIASES = {"USDTTRC": "USDT", "USDTERC": "USDT"}


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    """An emulator whose prices hold still (an hour-long tick) so tests can compare exactly;
    move them with ``POST /_control/<provider>/price`` or ``emulator.market.books[...]``."""
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as server:
        yield server


@pytest_asyncio.fixture
async def emulator_client() -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client with a short timeout, for providers and for the control API."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
        yield client


def make_provider(
    name: str, emulator: EmulatorServer, client: httpx.AsyncClient, **overrides: Any
) -> Provider:
    """A provider of ``name`` configured against ``emulator`` (aliases and USDT proxy as in the
    default settings); ``overrides`` replace any constructor argument."""
    cls = PROVIDER_CLASSES[name]
    options: dict[str, Any] = {
        "rest_url": emulator.rest_url(name),
        "ws_url": emulator.ws_url(name) if cls.supports_stream else None,
        "client": client,
        "aliases": ALIASES,
        "usd_proxy": "USDT",
    }
    options.update(overrides)
    if cls is CoinGeckoProvider:
        options.setdefault("api_key", None)
    return cls(**options)
