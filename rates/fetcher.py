"""Fetching: REST cycles over every provider, and the live owner (streams + polling).

One `Fetcher` drives a list of providers. Each provider has a `ProviderMonitor` (its circuit
breaker, last success and error, recent errors, stream state). Only the owner of live state
(SPEC 4) runs them: `watch` (`run_fetch --watch`) while it holds the lease, or `fetch_once` (the
django-q2 safety net, one-shot `run_fetch`, `POST /tasks/run` when no owner answers) for one cycle
when nobody holds it. The owner publishes `provider.state` on every breaker transition and saves
a status snapshot in the "shared" cache (Redis with REDIS_URL, files under var/ otherwise),
where `GET /api/v1/providers` in any web process reads it.

A failing provider is never fatal: its error is recorded, the others go on, and the cycle ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from config.jsonenc import dumps
from rates import metrics, policy, services
from rates.board import Entry
from rates.breaker import OPEN, CircuitBreaker
from rates.lease import RENEW_EVERY, Lease, lease_holder
from rates.providers import (
    Pair,
    Provider,
    ProviderError,
    ProviderRateLimited,
    Quote,
    build_providers,
)
from rates.providers.streaming import DISCONNECTED, STREAMING, stream_forever
from realtime import events, nats
from realtime.nats import Responder

logger = logging.getLogger(__name__)

STATUS_KEY = "rates:provider:{name}"
ERROR_WINDOW = 300.0  # errors_5m
# Providers with a freshness window of their own (CoinGecko's 60 s cache, CBR's daily table)
# are polled every quarter of that window in --watch, at most hourly: their data cannot change
# faster, and CoinGecko's public API rate-limits a 5 s poll.
PACE_FRACTION = 0.25
MAX_PACE = 3600.0
# A REST round that outlives this (or half a poll) is abandoned as a timeout, so one slow
# provider cannot hold a cycle (and with it the failover to the next provider).
MAX_ROUND_SECONDS = 10.0
# SPEC 6: POST /tasks/run waits this long for the owner before running the safety net itself.
CONTROL_TIMEOUT = 2.0


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


class ProviderMonitor:
    """Health of one provider on the owner: breaker, successes, errors, stream state.

    Status writes to the shared cache are never made on the event loop: `save()` only marks the
    status dirty, and the owner writes it with `flush_statuses()` from a worker thread.
    """

    def __init__(self, name: str, *, breaker: CircuitBreaker | None = None) -> None:
        self.name = name
        self.breaker = breaker or CircuitBreaker(name)
        self.breaker.on_change = self._on_breaker_change
        self.last_success: datetime | None = None
        self.last_error: str | None = None
        # When it happened: an old error beside a closed circuit is history, not a fault.
        self.last_error_at: datetime | None = None
        self.errors: deque[float] = deque()  # wall-clock times, so other processes can count
        self.streaming = False
        # When the stream last delivered a quote (monotonic), and how long it may then stay
        # silent and still count as a live source while REST fails (see `_is_down`).
        self.stream_quote_at: float | None = None
        self.stream_window = 5.0
        self.rest_failed = False
        self.dirty = True
        metrics.CIRCUIT_STATE.labels(name).set(0)

    def _on_breaker_change(self, name: str, state: str, reason: str) -> None:
        logger.warning("%s circuit %s: %s", name, state, reason, extra={"provider": name})
        metrics.CIRCUIT_STATE.labels(name).set(metrics.CIRCUIT_VALUES[state])
        if services.get_board().writable():
            events.publish("provider.state", {"name": name, "state": state, "reason": reason})
        self.save()

    def succeeded(self) -> None:
        self.last_success = timezone.now()
        self.rest_failed = False
        self.breaker.record_success()
        self._update_down()
        self.save()

    def failed(self, reason: str, *, kind: str, retry_after: float | None = None) -> None:
        now = time.time()
        self.last_error = reason
        self.last_error_at = timezone.now()
        self.errors.append(now)
        self.rest_failed = True
        metrics.PROVIDER_ERRORS.labels(self.name, kind).inc()
        self.breaker.record_failure(reason, retry_after=retry_after)
        self._update_down()
        self.save()

    def stream_state(self, state: str, reason: str) -> None:
        streaming = state == STREAMING
        if streaming:  # reported with a connection's first quote
            self.stream_quote_at = time.monotonic()
        if state == DISCONNECTED:
            self.last_error = f"stream: {reason}"
            self.last_error_at = timezone.now()
            self.errors.append(time.time())
            metrics.PROVIDER_ERRORS.labels(self.name, "stream").inc()
        if streaming != self.streaming:
            self.streaming = streaming
            self._update_down()
        self.save()

    def probe_every(self, seconds: float) -> None:
        """Keep an open circuit's back-off under one poll, so a recovered provider serves again
        at the next poll (SPEC 5); a rate limit still holds it open for its Retry-After. A
        stream silent for half that long no longer covers for a failing REST round."""
        self.stream_window = seconds / 2
        self.breaker.base_backoff = min(self.breaker.base_backoff, seconds)
        self.breaker.max_backoff = min(self.breaker.max_backoff, seconds)
        self.breaker.reset_backoff()

    def rate_limited(self, exc: ProviderRateLimited) -> None:
        """A 429/418 on a stream handshake: the same breaker as REST honours its Retry-After."""
        self.failed(str(exc), kind="rate_limited", retry_after=exc.retry_after)

    def _is_down(self) -> bool:
        """SPEC 5: down when its circuit is open, or when REST fails and no stream makes up for
        it. A stream counts only while it delivers: a connection that sends torn frames or
        lags far behind (garbage, slow) is no source, as a closed one is not."""
        if self.breaker.state == OPEN:
            return True
        if not self.rest_failed:
            return False
        quiet = self.stream_quote_at is None or (
            time.monotonic() - self.stream_quote_at > self.stream_window
        )
        return not self.streaming or quiet

    def _update_down(self) -> None:
        services.provider_set_down(self.name, self._is_down())

    def check_quiet(self) -> None:
        """Time alone takes a provider down: its stream fell silent while REST fails. Only a
        good REST round or a new stream connection brings it back, so a lagging stream's
        occasional late quote does not flip its pairs back and forth."""
        if self.name not in services.get_board().down and self._is_down():
            self._update_down()

    def stream_quote(self) -> None:
        """The stream delivered a valid quote (a success; the cache hears it at the next flush)."""
        self.last_success = timezone.now()
        self.stream_quote_at = time.monotonic()

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
            "last_error_at": _iso(self.last_error_at),
            "error_times": list(self.errors),
            "streaming": self.streaming,
        }

    def save(self) -> None:
        self.dirty = True

    def flush(self) -> None:
        """Write the status to the shared cache if it changed (sync: blocking I/O)."""
        if not self.dirty or not services.get_board().writable():
            return
        self.dirty = False
        order = settings.KURS_PROVIDERS
        priority = order.index(self.name) if self.name in order else len(order)
        try:
            caches["shared"].set(
                STATUS_KEY.format(name=self.name), self.status(priority=priority), None
            )
        except Exception as exc:
            # The status page is a convenience: a cache outage must not stop fetching.
            self.dirty = True
            status_saving.failed(exc)
        else:
            status_saving.worked()


class OutageNotice:
    """Whether a use of the shared cache fails. A Redis outage is said once when it starts
    (WARNING) and once when it ends (INFO), not for every provider at every flush or read."""

    def __init__(self, failing: str, back: str) -> None:
        self.failing = False
        self._failing_message = failing  # with one %s: the error
        self._back_message = back

    def failed(self, exc: Exception) -> None:
        if not self.failing:
            self.failing = True
            logger.warning(self._failing_message, exc)

    def worked(self) -> None:
        if self.failing:
            self.failing = False
            logger.info(self._back_message)


def status_saving_notice() -> OutageNotice:
    return OutageNotice(
        "cannot save provider statuses to the shared cache (retried at every flush, said again "
        "when it works): %s",
        "provider statuses are saved to the shared cache again",
    )


def status_reading_notice() -> OutageNotice:
    return OutageNotice(
        "provider statuses: the shared cache is unreachable, the statuses last read are "
        "answered (said again when it works): %s",
        "provider statuses are read from the shared cache again",
    )


status_saving = status_saving_notice()
status_reading = status_reading_notice()


_monitors: dict[str, ProviderMonitor] = {}


def monitor_for(name: str) -> ProviderMonitor:
    """The process-wide monitor of a provider (created on first use)."""
    if name not in _monitors:
        _monitors[name] = ProviderMonitor(name)
    return _monitors[name]


def flush_statuses() -> None:
    """Save every changed provider status (sync; the owner calls it off its event loop)."""
    for monitor in list(_monitors.values()):
        monitor.flush()


# What this process last read from the shared cache: served while the cache is unreachable.
_last_read_statuses: dict[str, Any] = {}


def provider_statuses() -> list[dict[str, Any]]:
    """Each configured provider's status as the fetching process last saved it (SPEC 5).

    With the shared cache unreachable (a Redis outage) the statuses this process last read are
    answered: an older view beats a 500 on `/providers` and a health that calls them all down.
    """
    names = list(settings.KURS_PROVIDERS)
    try:
        saved = caches["shared"].get_many([STATUS_KEY.format(name=name) for name in names])
    except Exception as exc:
        status_reading.failed(exc)
        saved = dict(_last_read_statuses)
    else:
        status_reading.worked()
        _last_read_statuses.clear()
        _last_read_statuses.update(saved)
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
                "last_error_at": status.get("last_error_at"),
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
        # Half a poll: a slow provider is known to be failing early enough to fail over within
        # one poll plus a second (SPEC 5), and its cycle still ends before the next one starts.
        self.round_timeout = round_timeout or min(MAX_ROUND_SECONDS, self.poll_interval / 2)
        self.cycles = 0
        self.stored = 0
        self._polled_ok: dict[str, float] = {}  # provider -> monotonic time of its last good round
        self._cycle_lock = asyncio.Lock()
        self._pairs: list[Pair] = []
        for provider in self.providers:
            # A little under the period, so that the next cycle's probe is never just too early.
            monitor_for(provider.name).probe_every(self.poll_interval * 0.9)
        self._requested: asyncio.Future[CycleReport] | None = None
        self._last_requested: tuple[float, CycleReport] | None = None

    async def pairs(self) -> list[Pair]:
        pairs = await sync_to_async(_wanted_pairs)()
        services.get_board().set_best_possible(
            {
                pair.code: policy.provider_priority(provider.name)
                for provider in reversed(self.providers)
                for pair in pairs
                if provider.supports(pair)
            }
        )
        self._pairs = pairs
        return pairs

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
        left out of the report. Cycles never overlap (a requested one waits for the running one).
        """
        async with self._cycle_lock:
            return await self._cycle(pace=pace, pairs=pairs)

    async def _cycle(self, *, pace: bool, pairs: Sequence[Pair] | None) -> CycleReport:
        started = time.perf_counter()
        if pairs is None:
            pairs = await self.pairs()
        polled = [provider for provider in self.providers if not pace or self.due(provider)]
        rounds = await asyncio.gather(*(self._round(provider, pairs) for provider in polled))
        await sync_to_async(_after_cycle)()
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
        if services.get_board().writable():
            events.publish("fetch.completed", report.event())
        return report

    async def _round(self, provider: Provider, pairs: Sequence[Pair]) -> ProviderRound:
        board = services.get_board()
        was_down = provider.name in board.down
        result = await self._guarded_round(provider, pairs)
        if result.status != "ok" or (provider.name in board.down) != was_down:
            # Fail its pairs over (or back) now, not when the slowest provider's round ends.
            await sync_to_async(services.reevaluate)()
        return result

    async def _guarded_round(self, provider: Provider, pairs: Sequence[Pair]) -> ProviderRound:
        monitor = monitor_for(provider.name)
        name = provider.name
        retry = monitor.breaker.retry_in()
        if 0 < retry <= self.round_timeout:
            # It half-opens within this round (a Retry-After that ends just after the poll
            # began): probe then, not a whole poll later.
            await asyncio.sleep(retry)
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
        await sync_to_async(monitor.succeeded)()
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
        logger.warning("%s: %s", monitor.name, reason, extra={"provider": monitor.name})
        monitor.failed(reason, kind=kind, retry_after=retry_after)
        return ProviderRound(monitor.name, f"error: {reason}", stored=stored)

    # --- the live owner ----------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event, *, lease: Lease | None = None) -> None:
        """Own live state until stopped: wait for the lease, then stream and poll while held.

        A second fetcher waits as a standby and takes over within the lease's TTL when the owner
        dies; an owner that loses its lease (a database outage longer than the TTL) stops writing
        at once and goes back to waiting.
        """
        lease = lease or Lease()
        board = services.get_board()
        waiting_logged = False
        try:
            while not stop.is_set():
                try:
                    if await sync_to_async(lease.try_acquire, thread_sensitive=False)():
                        waiting_logged = False
                        await self._own(lease, stop)
                        continue
                    if not waiting_logged:
                        holder = await sync_to_async(lease_holder)()
                        logger.info(
                            "standby: live rates are owned by %s; taking over if it stops",
                            holder.holder if holder else "another process",
                        )
                        waiting_logged = True
                except DatabaseError as exc:
                    # A database outage (or a terminated connection) pauses ownership, never
                    # ends the fetcher: a new connection is made and the lease tried again.
                    logger.warning("owner: database unavailable (%s); retrying", exc)
                    await sync_to_async(close_old_connections)()
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STANDBY_RETRY)
        finally:
            board.guard = _never
            await sync_to_async(lease.release)()

    async def _own(self, lease: Lease, stop: asyncio.Event) -> None:
        board = services.get_board()
        loaded = await sync_to_async(services.board_load)()
        board.guard = lease.held
        logger.info("owner: live rates loaded for %d pairs (epoch %s)", loaded, lease.epoch)
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep(lease, lost, stop))
        responder = serve_fetch_requests(self)
        try:
            await self._run(stop, lost)
        finally:
            responder.close()
            keeper.cancel()
            with suppress(asyncio.CancelledError):
                await keeper
            board.guard = _never
            if lost.is_set() and not stop.is_set():
                logger.error("owner: lease lost; stopped writing, waiting to take it again")

    async def _keep(self, lease: Lease, lost: asyncio.Event, stop: asyncio.Event) -> None:
        """Every TICK: renew the lease when due, re-decide pairs (time passes), save statuses."""
        renewed = time.monotonic()
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
            if time.monotonic() - renewed >= RENEW_EVERY:
                if not await sync_to_async(lease.try_acquire, thread_sensitive=False)():
                    lost.set()
                    return
                renewed = time.monotonic()
            try:
                await sync_to_async(_after_cycle)()
            except Exception:
                logger.exception("owner: re-evaluating the current rates failed")

    async def _run(self, stop: asyncio.Event, lost: asyncio.Event) -> None:
        """Streams from every streaming provider plus a REST cycle every poll interval.

        The set of pairs is re-read each cycle; when items change, the streams resubscribe.
        """
        streams: list[asyncio.Task[None]] = []
        stream_stop = asyncio.Event()
        streamed: list[Pair] = []
        ended = asyncio.create_task(_first_of(stop, lost))
        try:
            while not ended.done():
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
                    await asyncio.wait_for(asyncio.shield(ended), pause)
        finally:
            ended.cancel()
            await _stop_streams(streams, stream_stop)

    async def _stream(self, provider: Provider, pairs: list[Pair], stop: asyncio.Event) -> None:
        monitor = monitor_for(provider.name)
        accept = sync_to_async(services.accept_quote)

        async def on_quote(quote: Quote) -> None:
            result = await accept(quote)
            if result.accepted:  # a stream of rejected quotes (absurd prices) is no source
                monitor.stream_quote()
            self.stored += result.stored_count

        try:
            await stream_forever(
                provider,
                pairs,
                on_quote,
                stop=stop,
                on_state=monitor.stream_state,
                gate=monitor.breaker.retry_in,
                on_rate_limited=monitor.rate_limited,
            )
        finally:
            monitor.stream_state("stopped", "")

    async def cycle_now(self) -> CycleReport:
        """A cycle on request (`POST /tasks/run` through `kurs.ctl.fetch`): every provider.

        Requests that arrive while one runs share it, and one that ended less than
        `REQUEST_REUSE` ago answers for itself: a flood of requests never multiplies the calls
        to the exchanges (which ban an address that floods them).
        """
        running = self._requested
        if running is None or running.done():
            last = self._last_requested
            if last is not None and time.monotonic() - last[0] < REQUEST_REUSE:
                return last[1]
            running = asyncio.ensure_future(self.cycle(pace=False, pairs=self._pairs or None))
            running.add_done_callback(self._remember_requested)
            self._requested = running
        return await asyncio.shield(running)

    def _remember_requested(self, done: asyncio.Future[CycleReport]) -> None:
        if not done.cancelled() and done.exception() is None:
            self._last_requested = (time.monotonic(), done.result())


STANDBY_RETRY = 1.0
# The owner's clock: lease renewal when due, pairs decided again (a quote outlives its window, a
# stream falls silent). A quarter second keeps that well inside SPEC 5's "one poll plus a second".
TICK = 0.25
# A requested cycle this recent answers a new request (see Fetcher.cycle_now).
REQUEST_REUSE = 2.0


def _never() -> bool:
    return False


async def _first_of(*flags: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(flag.wait()) for flag in flags]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


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


def _after_cycle() -> None:
    """Time passed: decide every pair again, then save what changed in provider statuses."""
    for monitor in list(_monitors.values()):
        monitor.check_quiet()
    services.reevaluate()
    flush_statuses()


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


async def fetch_once(*, provider_names: Sequence[str] | None = None) -> CycleReport | None:
    """One REST cycle now, as the safety net: only when no live owner holds the lease.

    Takes the lease for the cycle (starting from the stored current rates) and gives it back.
    Returns None, having fetched nothing, while another process owns live state.
    """
    lease = Lease()
    if not await sync_to_async(lease.try_acquire)():
        return None
    board = services.get_board()
    board.guard = lease.held
    try:
        await sync_to_async(services.board_load)()
        names = list(provider_names or settings.KURS_PROVIDERS)
        poll = settings.KURS_POLL_INTERVAL
        async with http_client(min(MAX_ROUND_SECONDS, poll)) as client:
            fetcher = Fetcher(build_providers(names, client=client), poll_interval=poll)
            return await fetcher.cycle()
    finally:
        board.guard = _never
        await sync_to_async(lease.release)()


async def fetch_read_only(*, provider_names: Sequence[str] | None = None) -> CycleReport:
    """A cycle that quotes but never writes or publishes (`run_fetch` while another owns)."""
    board = services.get_board()
    board.guard = _never
    await sync_to_async(services.board_load)()
    names = list(provider_names or settings.KURS_PROVIDERS)
    poll = settings.KURS_POLL_INTERVAL
    async with http_client(min(MAX_ROUND_SECONDS, poll)) as client:
        return await Fetcher(build_providers(names, client=client), poll_interval=poll).cycle()


def fetch_rates() -> dict[str, Any]:
    """The django-q2 safety net: `fetch_once`, or nothing while a live owner runs."""
    report = async_to_sync(fetch_once)()
    if report is None:
        logger.info("safety net: a live owner holds the lease; nothing to do")
        return {"skipped": "a live owner holds the lease"}
    return report.event()


# --- POST /tasks/run through the owner -------------------------------------------------------
def control_subject() -> str:
    return f"{settings.KURS_NATS_PREFIX}.ctl.fetch"


def serve_fetch_requests(fetcher: Fetcher) -> Responder:
    """Answer `kurs.ctl.fetch` with a cycle of this owner's, for as long as it owns."""
    loop = asyncio.get_running_loop()

    async def handle(payload: bytes) -> bytes:
        future = asyncio.run_coroutine_threadsafe(fetcher.cycle_now(), loop)
        report = await asyncio.wrap_future(future)
        return dumps(report.event()).encode()

    return nats.serve(control_subject(), handle)


async def request_cycle() -> dict[str, Any] | None:
    """Ask the live owner for a cycle; its report, or None when no owner answered in time."""
    reply = await nats.request(control_subject(), b"{}", within=CONTROL_TIMEOUT)
    if reply is None:
        return None
    try:
        report = json.loads(reply, parse_float=Decimal)
    except ValueError:
        logger.warning("the owner's answer on %s is not JSON", control_subject())
        return None
    return report if isinstance(report, dict) else None
