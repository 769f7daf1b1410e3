"""Fixtures and helpers shared by the rates service tests (import the fixtures you use)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.cache import caches
from django.utils import timezone
from pytest_django import Settings

from rates import ondemand, peg_monitor, provider_health, services, upstream
from rates.board import QuoteBoard
from rates.emulator import EmulatorServer, run_emulator_server
from rates.models import CurrentRate
from rates.providers import Quote
from rates.snapshot import RatesSnapshot, snapshot

PROVIDERS = ["binance", "bybit", "coingecko", "cbr"]


@pytest.fixture
def fresh_board(monkeypatch: pytest.MonkeyPatch) -> QuoteBoard:
    """A fresh quote board (and fresh provider monitors, status cache and status saving state)
    for one test."""
    fresh = QuoteBoard()
    monkeypatch.setattr(services, "_board", fresh)
    monkeypatch.setattr(provider_health, "_monitors", {})
    monkeypatch.setattr(peg_monitor, "_monitor", None)
    monkeypatch.setattr(peg_monitor, "_read", None)
    monkeypatch.setattr(provider_health, "status_saving", provider_health.status_saving_notice())
    monkeypatch.setattr(provider_health, "status_reading", provider_health.status_reading_notice())
    caches["shared"].clear()
    return fresh


@pytest.fixture
def rate_settings(settings: Settings) -> Settings:
    settings.KURS_PROVIDERS = list(PROVIDERS)
    settings.KURS_STALE_AFTER = 30.0
    settings.KURS_MAX_JUMP = 0.2
    settings.KURS_USD_PROXY = "USDT"
    settings.KURS_ASSET_ALIASES = {"USDTTRC": "USDT", "USDTERC": "USDT"}
    return settings


def point_settings_at(settings: Settings, emulator: EmulatorServer) -> None:
    """Every provider URL setting pointed at the emulator."""
    settings.KURS_PROVIDER_URLS = {
        name: {
            "rest": emulator.rest_url(name),
            "ws": emulator.ws_url(name) if name in ("binance", "bybit") else None,
        }
        for name in PROVIDERS
    }


def make_quote(
    provider: str,
    pair: str,
    value: str | Decimal,
    *,
    age: float = 0.0,
    now: datetime | None = None,
    bid: str | None = None,
    ask: str | None = None,
) -> Quote:
    now = now or timezone.now()
    return Quote(
        provider=provider,
        pair=pair,
        value=Decimal(value),
        source_time=now - timedelta(seconds=age),
        bid=Decimal(bid) if bid is not None else None,
        ask=Decimal(ask) if ask is not None else None,
    )


def rate_events(
    published: list[tuple[str, dict[str, Any]]], pair: str | None = None
) -> list[dict[str, Any]]:
    """The data of every `rate.updated` seen (for one pair if given)."""
    return [
        envelope["data"]
        for _, envelope in published
        if envelope["type"] == "rate.updated"
        and (pair is None or envelope["data"]["direction"] == pair)
    ]


@contextmanager
def emulator_in_thread(tick: float = 3600) -> Iterator[EmulatorServer]:
    """The emulator on its own event loop in a thread, for sync tests and subprocesses.

    `tick`: seconds between price moves. The default keeps prices still for a test's length; a
    server that outlives a provider's freshness window (CoinGecko's 120 s) needs moving prices,
    or its quotes turn stale.
    """
    started: queue.Queue[EmulatorServer | BaseException] = queue.Queue()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with run_emulator_server(host="127.0.0.1", port=0, tick=tick, seed=7) as server:
                started.put(server)
                await stop.wait()
        except BaseException as exc:  # reported to the test thread below
            started.put(exc)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    server = started.get(timeout=10)
    if isinstance(server, BaseException):
        raise server
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


def emulator_env(emulator: EmulatorServer) -> dict[str, str]:
    """The environment that points a Kurs process at the emulator."""
    env: dict[str, str] = {}
    for name in PROVIDERS:
        env[f"KURS_{name.upper()}_REST_URL"] = emulator.rest_url(name)
        if name in ("binance", "bybit"):
            env[f"KURS_{name.upper()}_WS_URL"] = emulator.ws_url(name)
    return env


def store_current(
    item: Any,
    provider: str,
    value: str | Decimal,
    *,
    checked_ago: float = 0.0,
    status: str = "live",
    version: int = 1,
    **fields: Any,
) -> CurrentRate:
    """A CurrentRate row as the owner would have written it, confirmed `checked_ago` s ago."""
    checked = timezone.now() - timedelta(seconds=checked_ago)
    defaults = {
        "provider": provider,
        "value": Decimal(value),
        "source_time": checked,
        "checked_at": checked,
        "received_at": checked,
        "status": status,
        "version": version,
        **fields,
    }
    return CurrentRate.objects.update_or_create(item=item, defaults=defaults)[0]


class FakeClock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tracked(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The live snapshot's courses, as a dict the test fills (code -> course dict, as
    `snapshot.courses` returns them); any pair not in it is untracked."""
    courses: dict[str, dict[str, Any]] = {}

    def fake_courses(
        pairs: Iterable[str] | None = None, *, expand: bool = False
    ) -> list[dict[str, Any]]:
        wanted = courses if pairs is None else pairs
        return [courses[code] for code in sorted(wanted) if code in courses]

    monkeypatch.setattr(RatesSnapshot, "loaded", property(lambda self: True))
    monkeypatch.setattr(snapshot, "courses", fake_courses)
    # The tracked pairs are the dict's keys; their set is the items generation.
    monkeypatch.setattr(snapshot, "active_pairs", lambda: frozenset(courses))
    monkeypatch.setattr(
        RatesSnapshot, "items_generation", property(lambda self: hash(frozenset(courses)))
    )
    return courses


@pytest.fixture
def on_demand_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fresh on-demand rates cache for one test, on a clock the test moves."""
    clock = FakeClock()
    monkeypatch.setattr(ondemand, "on_demand", ondemand.OnDemandRates(clock=clock))
    upstream.weights.clear()  # request weights another test's exchange reported
    return clock
