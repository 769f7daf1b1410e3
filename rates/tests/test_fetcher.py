"""Fetch cycles and the watch loop against the exchange emulator over real loopback HTTP/WS."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection, connections
from prometheus_client import REGISTRY

from items.models import Item
from items.services import item_create, item_update
from rates import provider_health, services
from rates.emulator import EmulatorServer
from rates.fetcher import Fetcher
from rates.models import Rate
from rates.provider_health import monitor_for
from rates.providers import Provider
from rates.providers.base import REASON_LIMIT
from rates.providers.streaming import STREAMING
from rates.snapshot import RatesSnapshot
from rates.tests.conftest_emulator import make_provider
from rates.tests.support import rate_events, store_current
from realtime import nats
from tests.services import NATS_URL, free_port, require

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("rate_settings", "fresh_board"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:websockets.legacy.*"),
]

Events = list[tuple[str, dict[str, Any]]]
POLL = 0.5
# A healthy round over loopback takes milliseconds; on a machine shared by many processes it may
# take hundreds. Half a poll (the default) would call such a round a timeout: the tests give it a
# second, and make the "slow" exchange answer well after that.
ROUND = 1.0


class Clock:
    """The breakers' clock in these tests: it moves when the test says a poll went by."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def on_clock(watcher: Fetcher) -> Clock:
    """Put every provider breaker of `watcher` on a Clock of the test's."""
    clock = Clock()
    for provider in watcher.providers:
        monitor_for(provider.name).breaker.clock = clock
    return clock


async def until(condition: Callable[[], bool], *, within: float = 5.0) -> None:
    """Wait for `condition` (set by another task or thread), failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


@sync_to_async
def track(*codes: str) -> None:
    Item.objects.all().delete()
    for code in codes:
        base, quote = code.split("-")
        Item.objects.create(base=base, quote=quote)


@pytest.fixture(autouse=True)
async def close_worker_connections() -> AsyncIterator[None]:
    """sync_to_async runs the ORM on a worker thread: close its connection so that the test
    database can be dropped (PostgreSQL refuses while a session is open)."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(2 * ROUND)) as http:
        yield http


def providers(emulator: EmulatorServer, client: httpx.AsyncClient, *names: str) -> list[Provider]:
    return [make_provider(name, emulator, client) for name in names]


def over(
    emulator: EmulatorServer, client: httpx.AsyncClient, *names: str, poll: float = POLL
) -> Fetcher:
    """A Fetcher of the emulator's `names`, polling every `poll` seconds, rounds up to ROUND."""
    return Fetcher(providers(emulator, client, *names), poll_interval=poll, round_timeout=ROUND)


def serving(published: Events, pair: str) -> str | None:
    events = rate_events(published, pair)
    return events[-1]["provider"] if events else None


@pytest.fixture
async def nats_link(settings: Any) -> AsyncIterator[None]:
    """This process's NATS connection on the machine's NATS (item events reach the owner)."""
    host, port = NATS_URL.removeprefix("nats://").split(":")
    require("NATS", host, int(port))
    await asyncio.to_thread(nats.connection.shutdown)  # another test may have pointed it away
    settings.NATS_SERVERS = [NATS_URL]
    assert await asyncio.to_thread(nats.wait_connected, 10)
    yield
    await asyncio.to_thread(nats.connection.shutdown)


class Watching:
    """A `watch` task of `fetcher` until the block ends; `cycled` is set after each cycle."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self.cycled = asyncio.Event()
        self.stop = asyncio.Event()
        fetcher.on_cycle = lambda report: self.cycled.set()

    async def __aenter__(self) -> Watching:
        self.task = asyncio.create_task(self.fetcher.watch(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)

    async def next_cycle(self, within: float = 5.0) -> None:
        self.cycled.clear()
        await asyncio.wait_for(self.cycled.wait(), within)


def failovers(pair: str) -> float:
    return sum(
        REGISTRY.get_sample_value("kurs_failovers_total", {"pair": pair, "provider": name}) or 0
        for name in ("binance", "bybit", "coingecko", "cbr")
    )


async def test_a_cycle_stores_every_providers_quotes_and_reports_each(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events, settings: Any
) -> None:
    await track("BTC-USD", "BTC-RUB", "USDTTRC-RUB")
    names = ("binance", "bybit", "coingecko", "cbr")
    report = await over(emulator, client, *names).cycle()
    assert report.providers == dict.fromkeys(names, "ok")
    assert report.ok
    stored = await sync_to_async(
        lambda: sorted(Rate.objects.values_list("item__code", "provider"))
    )()
    assert stored == [
        ("BTC-RUB", "coingecko"),
        ("BTC-USD", "binance"),
        ("BTC-USD", "bybit"),
        ("BTC-USD", "coingecko"),
        ("USDTTRC-RUB", "coingecko"),
    ]
    assert report.stored == len(stored)
    assert serving(published_events, "BTC-USD") == "binance"
    (completed,) = [e["data"] for _, e in published_events if e["type"] == "fetch.completed"]
    assert completed == report.event()
    assert set(completed) == {"stored", "providers", "duration_ms"}
    rows = {row["pair"]: row for row in report.rows}
    assert rows["BTC-RUB"]["provider"] == "coingecko"


async def test_the_stored_value_is_exactly_the_exchanges_price(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    await track("BTC-USD")
    emulator.market.books["binance"].set("BTCUSDT", Decimal("91234.56789012"))
    await over(emulator, client, "binance").cycle()
    rate = await Rate.objects.aget(provider="binance")
    assert rate.value == Decimal("91234.56789012")


async def test_rub_pairs_come_as_a_cross_rate_when_coingecko_is_down(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events
) -> None:
    await track("BTC-RUB")
    emulator.market.books["binance"].set("BTCUSDT", Decimal("90000.5"))
    emulator.set_fault("coingecko", "down")
    names = ("binance", "coingecko", "cbr")
    await over(emulator, client, *names).cycle()
    (event,) = rate_events(published_events, "BTC-RUB")
    assert event["provider"] == "binance+cbr"
    assert event["derived"] is True
    assert event["value"] == Decimal("90000.5") * Decimal("80.0000")


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("down", {}),
        ("down", {"status": 500}),
        ("slow", {"delay": 3 * ROUND}),
        ("rate_limited", {"retry_after": 30}),
        ("garbage", {}),
        ("garbage", {"variant": "shape"}),
        ("absurd", {}),
    ],
)
async def test_it_fails_over_to_bybit_within_two_polls_when_binance_misbehaves(
    emulator: EmulatorServer,
    client: httpx.AsyncClient,
    published_events: Events,
    settings: Any,
    mode: str,
    options: dict[str, Any],
) -> None:
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    await track("BTC-USD")
    watcher = over(emulator, client, "binance", "bybit")
    clock = on_clock(watcher)
    await watcher.cycle()
    assert serving(published_events, "BTC-USD") == "binance"
    emulator.set_fault("binance", mode, **options)
    reports = [await watcher.cycle() for _ in range(2)]
    assert serving(published_events, "BTC-USD") == "bybit"
    assert reports[0].providers["binance"].startswith("error: ")
    assert reports[0].providers["bybit"] == "ok"
    assert reports[0].ok
    # Recovery: binance takes the pair back once it answers properly.
    emulator.set_fault("binance", "ok")
    if mode == "rate_limited":
        monitor_for("binance").breaker.open_until = 0.0  # skip the Retry-After, not the probe
    clock.advance(POLL)  # the next poll
    await watcher.cycle()
    assert serving(published_events, "BTC-USD") == "binance"


async def test_after_a_long_outage_a_recovered_provider_serves_again_at_the_next_poll(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events, settings: Any
) -> None:
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    await track("BTC-USD")
    watcher = over(emulator, client, "binance", "bybit")
    clock = on_clock(watcher)
    await watcher.cycle()
    emulator.set_fault("binance", "down")
    for _ in range(6):  # the circuit opens after three failures and stays open
        await watcher.cycle()
        clock.advance(POLL)
    assert monitor_for("binance").breaker.state in ("open", "half_open")
    assert serving(published_events, "BTC-USD") == "bybit"
    emulator.set_fault("binance", "ok")
    clock.advance(POLL)
    report = await watcher.cycle()
    assert report.providers["binance"] == "ok"
    assert monitor_for("binance").breaker.state == "closed"
    assert serving(published_events, "BTC-USD") == "binance"


async def test_a_429_keeps_the_circuit_open_for_retry_after_and_publishes_the_state(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events
) -> None:
    await track("BTC-USD")
    watcher = over(emulator, client, "binance")
    emulator.set_fault("binance", "rate_limited", retry_after=30)
    await watcher.cycle()
    breaker = monitor_for("binance").breaker
    assert breaker.state == "open"
    assert breaker.retry_in() > 29
    states = [e["data"] for _, e in published_events if e["type"] == "provider.state"]
    assert states[-1]["name"] == "binance"
    assert states[-1]["state"] == "open"
    asked = len(emulator.market.requests)
    report = await watcher.cycle()
    assert report.providers["binance"].startswith("error: circuit open")
    assert len(emulator.market.requests) == asked  # the open circuit spares the exchange
    assert not report.ok
    statuses = {status["name"]: status for status in provider_health.provider_statuses()}
    assert statuses["binance"]["state"] == "open"
    assert statuses["binance"]["errors_5m"] == 1


async def test_absurd_prices_are_rejected_and_counted(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    await track("ETH-USD")
    watcher = over(emulator, client, "binance", "bybit")
    await watcher.cycle()
    labels = {"provider": "binance", "reason": "jump"}
    before = REGISTRY.get_sample_value("kurs_quotes_rejected_total", labels) or 0.0
    emulator.set_fault("binance", "absurd")
    report = await watcher.cycle()
    # One per quote: ETH-USD alone (ETH-USDT, the leg of a cross rate through USDT-USD, is not
    # asked for: neither exchange quotes USDT-USD).
    assert REGISTRY.get_sample_value("kurs_quotes_rejected_total", labels) == before + 1
    assert "rejected (jump)" in report.providers["binance"]
    # Compared in Python: SQLite keeps exact decimals as text, which orders as text.
    values = await sync_to_async(lambda: list(Rate.objects.values_list("value", flat=True)))()
    assert values
    assert max(values) < 4000


async def test_an_unreachable_exchange_is_reported_never_fatal(
    client: httpx.AsyncClient, emulator: EmulatorServer
) -> None:
    await track("BTC-USD")
    closed = free_port()  # reserved: nothing listens there
    dead = make_provider("binance", emulator, client, rest_url=f"http://127.0.0.1:{closed}")
    report = await Fetcher([dead, *providers(emulator, client, "bybit")]).cycle()
    assert report.providers["binance"].startswith("error: cannot reach")
    assert report.providers["bybit"] == "ok"
    assert report.ok


async def test_a_crashing_provider_is_reported_as_bounded_plain_text(
    client: httpx.AsyncClient, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a provider (not a ProviderError): the round fails with its type and message,
    without markup and bounded, in the report and in the status `/providers` shows."""
    await track("BTC-USD")
    broken = make_provider("binance", emulator, client)

    async def crash(pairs: object) -> list[Any]:
        raise ValueError("<html><title>Oops</title>" + "y" * 5000 + "</html>")

    monkeypatch.setattr(broken, "fetch", crash)
    report = await Fetcher([broken]).cycle()
    status = report.providers["binance"]
    assert status == "error: ValueError: Oops"
    (saved,) = [s for s in provider_health.provider_statuses() if s["name"] == "binance"]
    assert saved["last_error"] == "ValueError: Oops"
    long = make_provider("bybit", emulator, client)

    async def long_crash(pairs: object) -> list[Any]:
        raise RuntimeError("<b>no</b> " + "z" * 5000)

    monkeypatch.setattr(long, "fetch", long_crash)
    reason = (await Fetcher([long]).cycle()).providers["bybit"].removeprefix("error: ")
    assert reason.startswith("RuntimeError: no zzz")
    assert len(reason) <= REASON_LIMIT
    assert "<" not in reason


async def test_watch_streams_prices_and_reconnects_after_a_dropped_stream(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events
) -> None:
    await track("BTC-USD")
    # A long poll interval: after the first cycle, only the stream can deliver a new price.
    watcher = Fetcher(providers(emulator, client, "binance"), poll_interval=60)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.watch(stop))
    monitor = monitor_for("binance")
    try:
        await until(lambda: monitor.streaming and watcher.cycles == 1)
        emulator.market.books["binance"].set("BTCUSDT", Decimal("91000.5"))
        await until(
            lambda: any(e["value"] == Decimal("91000.5") for e in rate_events(published_events))
        )
        emulator.set_fault("binance", "drop_stream")
        await until(lambda: not monitor.streaming)
        assert monitor.last_error is not None
        assert monitor.last_error.startswith("stream: ")
        emulator.set_fault("binance", "ok")
        await until(lambda: monitor.streaming, within=10)
        emulator.market.books["binance"].set("BTCUSDT", Decimal("91001.5"))
        await until(
            lambda: any(e["value"] == Decimal("91001.5") for e in rate_events(published_events))
        )
        values = await sync_to_async(lambda: set(Rate.objects.values_list("value", flat=True)))()
        assert Decimal("91001.5") in values
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert watcher.cycles == 1


async def test_a_rest_round_skips_the_pairs_the_stream_delivered_within_the_poll(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events
) -> None:
    """The stream confirmed BTC-USD moments ago: the round's BTC-USD quote adds nothing and is
    not accepted again (docs/scaling.md#the-owner); the round is still a good one."""
    await track("BTC-USD")
    watcher = Fetcher(providers(emulator, client, "binance"), poll_interval=60)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.watch(stop))
    labels = {"provider": "binance"}
    try:
        await until(lambda: monitor_for("binance").streaming and watcher.cycles == 1)
        emulator.market.books["binance"].set("BTCUSDT", Decimal("91000.5"))
        await until(
            lambda: any(e["value"] == Decimal("91000.5") for e in rate_events(published_events))
        )
        before = REGISTRY.get_sample_value("kurs_quotes_accepted_total", labels)
        report = await watcher.cycle_now()
        after = REGISTRY.get_sample_value("kurs_quotes_accepted_total", labels)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert report.providers == {"binance": "ok"}
    assert report.valid == 1
    assert after == before


async def test_watch_fails_over_within_two_poll_periods_when_binance_goes_down(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events, settings: Any
) -> None:
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    await track("BTC-USD")
    watcher = over(emulator, client, "binance", "bybit")
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.watch(stop))
    try:
        await until(lambda: serving(published_events, "BTC-USD") == "binance")
        failed_at = len(published_events)
        emulator.set_fault("binance", "down")
        await until(lambda: serving(published_events, "BTC-USD") == "bybit", within=10)
        # Counted in polls, not seconds: at most two cycles ended (the one running when
        # binance went down, and the next) before the pair failed over.
        after = published_events[failed_at:]
        failover = next(
            n
            for n, (_, e) in enumerate(after)
            if e["type"] == "rate.updated"
            and e["data"]["direction"] == "BTC-USD"
            and e["data"]["provider"] == "bybit"
        )
        cycles = [e for _, e in after[:failover] if e["type"] == "fetch.completed"]
        assert len(cycles) <= 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_watch_survives_a_database_error_while_taking_ownership(
    emulator: EmulatorServer,
    client: httpx.AsyncClient,
    published_events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pg_terminate_backend as the owner loads its board: it retries, it does not exit."""
    await track("BTC-USD")
    real_load = services.board_load
    failures = [OperationalError("terminating connection due to administrator command")]

    def flaky_load(**kwargs: Any) -> int:
        if failures:
            raise failures.pop()
        return real_load(**kwargs)

    monkeypatch.setattr(services, "board_load", flaky_load)
    watcher = over(emulator, client, "binance")
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.watch(stop))
    try:
        await until(lambda: serving(published_events, "BTC-USD") == "binance", within=10)
        assert not failures
        assert not task.done()
        # The "no owner of live state" alert reads this (docs/operations.md#alerts).
        assert REGISTRY.get_sample_value("kurs_owner_lease_held") == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert REGISTRY.get_sample_value("kurs_owner_lease_held") == 0


async def test_watch_paces_providers_whose_data_changes_slowly(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    await track("BTC-RUB", "BTC-USD")
    watcher = over(emulator, client, "binance", "coingecko", "cbr", poll=1)
    first = await watcher.cycle(pace=True)
    second = await watcher.cycle(pace=True)
    assert list(first.providers) == ["binance", "coingecko", "cbr"]
    # CoinGecko caches for 60 s and CBR publishes daily: asking again at once would only spend
    # their rate limits. Binance is asked every poll.
    assert list(second.providers) == ["binance"]
    unpaced = await watcher.cycle()
    assert list(unpaced.providers) == ["binance", "coingecko", "cbr"]
    asked = [request.provider for request in emulator.market.requests]
    assert asked.count("cbr") == 2


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def _terminate(pid: int) -> None:
    """Kill one server session from outside, as a PostgreSQL restart or failover would."""
    params = connection.get_connection_params()
    with psycopg.connect(**params, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


@pytest.mark.postgres
async def test_the_fetcher_reconnects_after_the_database_dropped_its_connection(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only (run with DATABASE_URL=postgres://...)")
    await track("BTC-USD")
    watcher = over(emulator, client, "binance")
    await watcher.cycle()
    await sync_to_async(_terminate)(await sync_to_async(_backend_pid)())
    emulator.market.books["binance"].set("BTCUSDT", Decimal("91111"))
    report = await watcher.cycle()
    assert report.providers["binance"] == "ok"
    assert report.stored == 1


async def test_a_flood_of_requested_cycles_calls_each_exchange_once(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    await track("BTC-USD")
    fetch = over(emulator, client, "binance", "bybit")
    emulator.market.requests.clear()
    reports = await asyncio.gather(*(fetch.cycle_now() for _ in range(50)))
    assert all(report is reports[0] for report in reports)
    assert reports[0].providers == {"binance": "ok", "bybit": "ok"}
    # ...and one more right after is answered by the same cycle.
    assert await fetch.cycle_now() is reports[0]
    calls = [(r.provider, r.path) for r in emulator.market.requests]
    assert calls.count(("binance", "/api/v3/ticker/price")) == 1
    assert calls.count(("bybit", "/v5/market/tickers")) == 1


def test_rest_failing_with_a_silent_stream_is_down_until_a_good_round() -> None:
    """Down when REST fails and no stream makes up for it, or when the circuit is open.
    A stream counts while it delivers; a lagging stream's late quote does not bring it back."""
    board = services.get_board()
    monitor = provider_health.ProviderMonitor("binance")
    monitor.stream_window = 0.5
    monitor.stream_state(STREAMING, "connected")
    monitor.failed("HTTP 503", kind="http")
    assert "binance" not in board.down  # the stream just delivered: it covers for REST
    monitor.stream_quote_at = time.monotonic() - 1  # ...and then fell silent
    monitor.check_quiet()
    assert "binance" in board.down
    monitor.stream_quote()  # one late quote
    monitor.check_quiet()
    assert "binance" in board.down
    monitor.succeeded()
    assert "binance" not in board.down
    monitor.failed("HTTP 429", kind="rate_limited", retry_after=30)  # the circuit opens at once
    monitor.stream_quote()
    monitor.check_quiet()
    assert "binance" in board.down


@pytest.mark.nats
@pytest.mark.usefixtures("nats_link")
async def test_a_new_pair_is_first_published_live_from_the_top_provider_at_once(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events, settings: Any
) -> None:
    """Bybit answers first (Binance is slow), yet the first status of a new SOL-USD is Binance's
    `live`, not a `failover` corrected a moment later; and the owner hears the item event
    instead of waiting for its next poll."""
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    await track("BTC-USD")
    emulator.set_fault("binance", "slow", delay=0.3)  # its REST answers and its stream frames
    # No poll comes within the test: only the item event can have SOL-USD quoted (no time bound
    # on a loaded machine; an owner deaf to item events fails the wait below, however long).
    poll = 3600.0
    async with Watching(over(emulator, client, "binance", "bybit", poll=poll)) as watching:
        await watching.next_cycle()  # the first poll, without SOL-USD
        watching.cycled.clear()
        await sync_to_async(item_create)(base="SOL", quote="USD")
        # The cycle the item event started (Bybit's quotes too have arrived when it ends).
        await asyncio.wait_for(watching.cycled.wait(), 60)
    first, *later = rate_events(published_events, "SOL-USD")
    assert (first["provider"], first["status"], first["version"]) == ("binance", "live", 1)
    assert all(event["status"] == "live" for event in later)
    assert failovers("SOL-USD") == 0


async def test_a_new_pair_whose_top_provider_fails_its_first_round_is_no_failover(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events, settings: Any
) -> None:
    """Binance cannot quote the new pair: Bybit's quote is its true first status, `failover`,
    published once Binance's round failed, and no failover is counted for a pair never served."""
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    await track("BTC-USD")
    fetcher = over(emulator, client, "binance", "bybit")
    await fetcher.cycle()
    emulator.set_fault("binance", "slow", delay=3 * ROUND)  # a timeout, after Bybit answered
    await sync_to_async(item_create)(base="SOL", quote="USD")
    report = await fetcher.cycle()
    assert report.providers["binance"].startswith("error: timed out")
    (first,) = rate_events(published_events, "SOL-USD")
    assert (first["provider"], first["status"]) == ("bybit", "failover")
    assert failovers("SOL-USD") == 0


async def test_a_pair_only_cbr_quotes_is_published_within_one_poll_of_its_creation(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events
) -> None:
    """CBR is asked at most hourly (its table changes daily), but a new pair it alone can quote
    is asked for in the next cycle and so reaches the web snapshot (`/courses`) within a poll."""
    await track("BTC-USD", "USD-RUB")
    web = RatesSnapshot()
    await sync_to_async(web.load)()
    poll = 1.0
    async with Watching(over(emulator, client, "binance", "cbr", poll=poll)) as watching:
        await watching.next_cycle()
        created = time.monotonic()
        item = await sync_to_async(item_create)(base="CNY", quote="RUB")
        await until(lambda: bool(rate_events(published_events, "CNY-RUB")), within=poll + ROUND)
        latency = time.monotonic() - created
    (event,) = rate_events(published_events, "CNY-RUB")
    assert (event["provider"], event["status"]) == ("cbr", "live")
    # What the web process's bridge does with the events it hears:
    web.apply_item("item.created", {"code": item.code, "is_active": True})
    web.apply_rate(event)
    (course,) = web.courses(["CNY-RUB"])
    assert (course["provider"], course["status"]) == ("cbr", "live")
    print(f"CNY-RUB: item created -> first rate.updated (cbr, live) in {latency:.3f}s")


async def test_an_item_activated_again_continues_its_stored_version(
    emulator: EmulatorServer, client: httpx.AsyncClient, published_events: Events
) -> None:
    """The web snapshot keeps an inactive pair's last course (version 7 here): the owner's
    first write after the activation must be version 8, or readers would drop it as old."""
    await track("BTC-USD", "ETH-USD")
    eth = await Item.objects.aget(code="ETH-USD")
    await sync_to_async(store_current)(eth, "binance", "3000", checked_ago=3600, version=7)
    await sync_to_async(item_update)(item=eth, is_active=False)
    fetcher = over(emulator, client, "binance")
    await fetcher.cycle()
    assert not rate_events(published_events, "ETH-USD")
    await sync_to_async(item_update)(item=eth, is_active=True)
    await fetcher.cycle()
    (event,) = rate_events(published_events, "ETH-USD")
    assert (event["provider"], event["status"], event["version"]) == ("binance", "live", 8)


def provider_lines(
    records: list[logging.LogRecord], name: str, level: int
) -> list[logging.LogRecord]:
    return [
        record
        for record in records
        if record.levelno == level and record.getMessage().startswith(f"{name}")
    ]


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    emulator: EmulatorServer,
    client: httpx.AsyncClient,
    published_events: Events,
    caplog: pytest.LogCaptureFixture,
    settings: Any,
) -> None:
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    caplog.set_level(logging.DEBUG, logger="rates")
    await track("BTC-USD")
    async with Watching(over(emulator, client, "binance", "bybit", poll=0.3)) as watching:
        await until(lambda: serving(published_events, "BTC-USD") == "binance")
        emulator.set_fault("binance", "down")
        for _ in range(6):  # past the circuit's opening, several probes and stream retries
            await watching.next_cycle()
        said = len([r for r in caplog.records if r.levelno >= logging.WARNING])
        for _ in range(3):
            await watching.next_cycle()
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == said
        emulator.set_fault("binance", "ok")
        await until(lambda: serving(published_events, "BTC-USD") == "binance", within=10)
        await until(lambda: monitor_for("binance").streaming, within=10)
    warnings = sorted(r.getMessage() for r in provider_lines(caplog.records, "binance", 30))
    assert len(warnings) == 2, warnings  # REST and the stream, each once
    assert warnings[0].startswith("binance failing: HTTP 503")
    assert warnings[1].startswith("binance: stream dropped")
    repeats = provider_lines(caplog.records, "binance", logging.DEBUG)
    assert len(repeats) >= 5  # each failed round after the first, at DEBUG
    ended = [r.getMessage() for r in provider_lines(caplog.records, "binance", logging.INFO)]
    assert len([line for line in ended if "answers again" in line]) == 1
    assert len([line for line in ended if "stream delivers again" in line]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "bybit" in r.msg]
    assert not [r for r in caplog.records if "make demo" in r.getMessage()]


async def test_with_no_provider_reachable_it_suggests_the_emulator_once(
    emulator: EmulatorServer,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    settings: Any,
) -> None:
    """Offline: one warning per provider when it first fails, one hint at `make demo`, and
    then silence at WARNING however many polls go by."""
    settings.KURS_PROVIDERS = ["binance", "bybit", "cbr"]
    caplog.set_level(logging.DEBUG, logger="rates")
    await track("BTC-USD", "USD-RUB")
    closed = free_port()  # reserved: nothing listens there
    nowhere = f"127.0.0.1:{closed}"
    dead = [
        make_provider(
            name,
            emulator,
            client,
            rest_url=f"http://{nowhere}/{name}",
            ws_url=f"ws://{nowhere}/{name}" if name != "cbr" else None,
        )
        for name in ("binance", "bybit", "cbr")
    ]
    fetcher = Fetcher(dead, poll_interval=0.3, round_timeout=ROUND)
    async with Watching(fetcher) as watching:
        for _ in range(5):
            await watching.next_cycle()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    hints = [line for line in warnings if "make demo" in line]
    assert len(hints) == 1
    assert hints[0].startswith("no provider could be reached")
    for name in ("binance", "bybit", "cbr"):
        failing = [line for line in warnings if line.startswith(f"{name} failing: cannot reach")]
        assert len(failing) == 1, warnings
    streams = [line for line in warnings if "stream dropped" in line]
    assert sorted(line.split(":")[0] for line in streams) == ["binance", "bybit"]
    assert len(warnings) == 3 + 2 + 1, warnings
