"""Fetching: REST cycles over every provider, and the long-running watch (streams + polling).

One `Fetcher` drives a list of providers. Each provider has a `ProviderMonitor` (its circuit
breaker, last success and error, recent errors, stream state) that lives for the whole process,
so breakers keep their state across the minute cycles of a django-q2 worker as well as in
`run_fetch --watch`. Monitors publish `provider.state` on every breaker transition and save a
status snapshot in the "shared" cache (Redis with REDIS_URL, files under var/ otherwise), where
`GET /api/v1/providers` in any web process reads the fetcher's view.

A failing provider is never fatal: its error is recorded, the others go on, and the cycle ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.db import close_old_connections
from django.utils import timezone

from rates import metrics, services
from rates.board import Entry
from rates.breaker import CircuitBreaker
from rates.providers import (
    Pair,
    Provider,
    ProviderError,
    ProviderRateLimited,
    Quote,
    build_providers,
)
from rates.providers.streaming import DISCONNECTED, STREAMING, stream_forever
from realtime import events

logger = logging.getLogger(__name__)

STATUS_KEY = "rates:provider:{name}"
ERROR_WINDOW = 300.0  # errors_5m
# Providers with a freshness window of their own (CoinGecko's 60 s cache, CBR's daily table)
# are polled every quarter of that window in --watch, at most hourly: their data cannot change
# faster, and CoinGecko's public API rate-limits a 5 s poll.
PACE_FRACTION = 0.25
MAX_PACE = 3600.0
# A REST round that outlives this is abandoned as a timeout, so one slow provider cannot hold
# a cycle (and with it the failover to the next provider) longer than one poll period.
MAX_ROUND_SECONDS = 10.0


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


class ProviderMonitor:
    """Health of one provider in this process: breaker, successes, errors, stream state."""

    def __init__(self, name: str, *, breaker: CircuitBreaker | None = None) -> None:
        self.name = name
        self.breaker = breaker or CircuitBreaker(name)
        self.breaker.on_change = self._on_breaker_change
        self.last_success: datetime | None = None
        self.last_error: str | None = None
        self.errors: deque[float] = deque()  # wall-clock times, so other processes can count
        self.streaming = False
        self.rest_failed = False
        metrics.CIRCUIT_STATE.labels(name).set(0)

    def _on_breaker_change(self, name: str, state: str, reason: str) -> None:
        logger.warning("%s circuit %s: %s", name, state, reason)
        metrics.CIRCUIT_STATE.labels(name).set(metrics.CIRCUIT_VALUES[state])
        events.publish("provider.state", {"name": name, "state": state, "reason": reason})
        self.save()

    def succeeded(self) -> None:
        self.last_success = timezone.now()
        self.rest_failed = False
        self.breaker.record_success()
        self._update_down()

    def failed(self, reason: str, *, kind: str, retry_after: float | None = None) -> None:
        now = time.time()
        self.last_error = reason
        self.errors.append(now)
        self.rest_failed = True
        metrics.PROVIDER_ERRORS.labels(self.name, kind).inc()
        self.breaker.record_failure(reason, retry_after=retry_after)
        self._update_down()

    def stream_state(self, state: str, reason: str) -> None:
        streaming = state == STREAMING
        if state == DISCONNECTED:
            self.last_error = f"stream: {reason}"
            self.errors.append(time.time())
            metrics.PROVIDER_ERRORS.labels(self.name, "stream").inc()
        if streaming != self.streaming:
            self.streaming = streaming
            self._update_down()
            self.save()

    def _update_down(self) -> None:
        services.provider_set_down(self.name, self.rest_failed and not self.streaming)

    def status(self, *, priority: int) -> dict[str, Any]:
        cutoff = time.time() - ERROR_WINDOW
        while self.errors and self.errors[0] < cutoff:
            self.errors.popleft()
        return {
            "name": self.name,
            "priority": priority,
            "state": self.breaker.state,
            "last_success": _iso(self.last_success),
            "last_error": self.last_error,
            "error_times": list(self.errors),
            "streaming": self.streaming,
        }

    def save(self) -> None:
        order = settings.KURS_PROVIDERS
        priority = order.index(self.name) if self.name in order else len(order)
        try:
            caches["shared"].set(
                STATUS_KEY.format(name=self.name), self.status(priority=priority), None
            )
        except Exception:
            # The status page is a convenience: a cache outage must not stop fetching.
            logger.exception("cannot save %s status to the cache", self.name)


_monitors: dict[str, ProviderMonitor] = {}


def monitor_for(name: str) -> ProviderMonitor:
    """The process-wide monitor of a provider (created on first use)."""
    if name not in _monitors:
        _monitors[name] = ProviderMonitor(name)
    return _monitors[name]


def provider_statuses() -> list[dict[str, Any]]:
    """Each configured provider's status as the fetching process last saved it (SPEC 5)."""
    names = list(settings.KURS_PROVIDERS)
    saved = caches["shared"].get_many([STATUS_KEY.format(name=name) for name in names])
    cutoff = time.time() - ERROR_WINDOW
    statuses = []
    for priority, name in enumerate(names):
        status = saved.get(STATUS_KEY.format(name=name)) or {}
        statuses.append(
            {
                "name": name,
                "priority": priority,
                "state": status.get("state", "closed"),
                "last_success": status.get("last_success"),
                "last_error": status.get("last_error"),
                "errors_5m": sum(1 for at in status.get("error_times", ()) if at >= cutoff),
                "streaming": bool(status.get("streaming", False)),
            }
        )
    return statuses


@dataclass
class ProviderRound:
    """One provider's part of a cycle: `status` is "ok" or "error: ..." (SPEC 5)."""

    name: str
    status: str
    valid: int = 0
    stored: int = 0


@dataclass
class CycleReport:
    stored: int
    providers: dict[str, str]
    duration_ms: int
    valid: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """At least one provider returned valid quotes (run_fetch exits 0)."""
        return self.valid > 0

    def event(self) -> dict[str, Any]:
        return {"stored": self.stored, "providers": self.providers, "duration_ms": self.duration_ms}


class Fetcher:
    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        poll_interval: float | None = None,
        round_timeout: float | None = None,
        on_cycle: Callable[[CycleReport], None] | None = None,
    ) -> None:
        self.providers = list(providers)
        self.on_cycle = on_cycle
        self.poll_interval = poll_interval or settings.KURS_POLL_INTERVAL
        self.round_timeout = round_timeout or min(MAX_ROUND_SECONDS, self.poll_interval)
        self.cycles = 0
        self.stored = 0
        self._polled_ok: dict[str, float] = {}  # provider -> monotonic time of its last good round

    async def pairs(self) -> list[Pair]:
        return await sync_to_async(_wanted_pairs)()

    def due(self, provider: Provider) -> bool:
        """Is a paced provider's data old enough to ask again (see PACE_FRACTION)?"""
        last = self._polled_ok.get(provider.name)
        if provider.freshness is None or last is None:
            return True
        gap = max(self.poll_interval, min(MAX_PACE, provider.freshness * PACE_FRACTION))
        return time.monotonic() - last >= gap - self.poll_interval / 10

    async def cycle(
        self, *, pace: bool = False, pairs: Sequence[Pair] | None = None
    ) -> CycleReport:
        """One REST round over every provider, concurrently; publishes `fetch.completed`.

        With `pace`, providers whose data is still recent (see `due`) sit the cycle out and are
        left out of the report.
        """
        started = time.perf_counter()
        if pairs is None:
            pairs = await self.pairs()
        polled = [provider for provider in self.providers if not pace or self.due(provider)]
        rounds = await asyncio.gather(*(self._round(provider, pairs) for provider in polled))
        duration = time.perf_counter() - started
        report = CycleReport(
            stored=sum(item.stored for item in rounds),
            providers={item.name: item.status for item in rounds},
            duration_ms=round(duration * 1000),
            valid=sum(item.valid for item in rounds),
        )
        report.rows = await sync_to_async(_table_rows)()
        self.cycles += 1
        self.stored += report.stored
        metrics.FETCH_CYCLES.labels("ok" if report.ok else "failed").inc()
        metrics.FETCH_DURATION.observe(duration)
        events.publish("fetch.completed", report.event())
        return report

    async def _round(self, provider: Provider, pairs: Sequence[Pair]) -> ProviderRound:
        monitor = monitor_for(provider.name)
        try:
            return await self._guarded_round(provider, monitor, pairs)
        finally:
            monitor.save()

    async def _guarded_round(
        self, provider: Provider, monitor: ProviderMonitor, pairs: Sequence[Pair]
    ) -> ProviderRound:
        name = provider.name
        if not monitor.breaker.allow():
            retry = monitor.breaker.retry_in()
            return ProviderRound(name, f"error: circuit open, retry in {retry:.0f}s")
        supported = [pair for pair in pairs if provider.supports(pair)]
        if not supported:
            return ProviderRound(name, "ok")
        try:
            async with asyncio.timeout(self.round_timeout):
                quotes = await provider.fetch(supported)
        except ProviderRateLimited as exc:
            return self._failed(monitor, str(exc), "rate_limited", retry_after=exc.retry_after)
        except ProviderError as exc:
            return self._failed(monitor, str(exc), type(exc).__name__)
        except TimeoutError:
            return self._failed(monitor, f"timed out after {self.round_timeout:g}s", "timeout")
        except Exception as exc:
            # A provider bug must not stop the others or the cycle.
            logger.exception("%s: fetch crashed", name)
            return self._failed(monitor, f"{type(exc).__name__}: {exc}", "crash")
        results = await sync_to_async(services.accept_quotes)(quotes)
        valid = sum(result.accepted for result in results)
        stored = sum(result.stored_count for result in results)
        if quotes and not valid:
            reasons = sorted({result.reason or "" for result in results})
            reason = f"all {len(quotes)} quotes rejected ({', '.join(reasons)})"
            return self._failed(monitor, reason, "rejected", stored=stored)
        monitor.succeeded()
        self._polled_ok[name] = time.monotonic()
        return ProviderRound(name, "ok", valid=valid, stored=stored)

    @staticmethod
    def _failed(
        monitor: ProviderMonitor,
        reason: str,
        kind: str,
        *,
        retry_after: float | None = None,
        stored: int = 0,
    ) -> ProviderRound:
        logger.warning("%s: %s", monitor.name, reason)
        monitor.failed(reason, kind=kind, retry_after=retry_after)
        return ProviderRound(monitor.name, f"error: {reason}", stored=stored)

    async def watch(self, stop: asyncio.Event) -> None:
        """Streams from every streaming provider plus a REST cycle every poll interval.

        The set of pairs is re-read each cycle; when items change, the streams resubscribe.
        """
        streams: list[asyncio.Task[None]] = []
        stream_stop = asyncio.Event()
        streamed: list[Pair] = []
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    pairs = await self.pairs()
                    if pairs != streamed:
                        await _stop_streams(streams, stream_stop)
                        stream_stop = asyncio.Event()
                        streams = [
                            asyncio.create_task(self._stream(provider, pairs, stream_stop))
                            for provider in self.providers
                            if provider.supports_stream
                        ]
                        streamed = pairs
                    report = await self.cycle(pace=True, pairs=pairs)
                    if self.on_cycle is not None:
                        self.on_cycle(report)
                except Exception:
                    # A database outage ends this cycle, not the fetcher: the next one retries.
                    logger.exception("fetch cycle failed")
                # A steady cadence: the next cycle starts one interval after this one started.
                pause = max(0.0, started + self.poll_interval - time.monotonic())
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
        finally:
            await _stop_streams(streams, stream_stop)

    async def _stream(self, provider: Provider, pairs: list[Pair], stop: asyncio.Event) -> None:
        monitor = monitor_for(provider.name)
        accept = sync_to_async(services.accept_quote)

        async def on_quote(quote: Quote) -> None:
            # A delivered quote is a success; it reaches the cache with the next save.
            monitor.last_success = timezone.now()
            self.stored += (await accept(quote)).stored_count

        try:
            await stream_forever(
                provider, pairs, on_quote, stop=stop, on_state=monitor.stream_state
            )
        finally:
            monitor.stream_state("stopped", "")


async def _stop_streams(streams: list[asyncio.Task[None]], stop: asyncio.Event) -> None:
    stop.set()
    if streams:
        await asyncio.gather(*streams, return_exceptions=True)


def _wanted_pairs() -> list[Pair]:
    # A long-running fetcher outlives database restarts: drop a broken (or, with CONN_MAX_AGE
    # 0, any) connection once per cycle, as Django does between requests, so the next query
    # reconnects instead of failing forever.
    close_old_connections()
    return services.wanted_pairs(services.active_items())


def _table_rows() -> list[dict[str, Any]]:
    """Pair, value, provider and age of every active item as this process now serves it."""
    board = services.get_board()
    now = timezone.now()
    rows = []
    for code in sorted(services.active_items(board=board)):
        entry: Entry | None = board.best(code, now=now)
        rows.append(
            {
                "pair": code,
                "value": entry.value if entry else None,
                "provider": entry.provider if entry else None,
                "age_s": round((now - entry.source_time).total_seconds(), 1) if entry else None,
                "derived": entry.derived if entry else False,
            }
        )
    return rows


def http_client(timeout: float) -> httpx.AsyncClient:
    """The providers' HTTP client: one connection pool, bounded waits, a recognisable agent."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": "kurs"},
        follow_redirects=False,
    )


async def fetch_once(*, provider_names: Sequence[str] | None = None) -> CycleReport:
    """One REST cycle over the configured providers (or `provider_names`), now."""
    names = list(provider_names or settings.KURS_PROVIDERS)
    poll = settings.KURS_POLL_INTERVAL
    async with http_client(min(MAX_ROUND_SECONDS, poll)) as client:
        return await Fetcher(build_providers(names, client=client), poll_interval=poll).cycle()


def fetch_rates() -> dict[str, Any]:
    """`fetch_once` for sync callers (the django-q2 task); returns the `fetch.completed` data."""
    return async_to_sync(fetch_once)().event()
