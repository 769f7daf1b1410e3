"""The live owner: REST cycles over every provider, and streams, while it holds the lease.

One `Fetcher` drives a list of providers, each watched by its `ProviderMonitor`
(`rates.provider_health`). Only the owner of live state runs them: `watch` (`run_fetch --watch`)
while it holds the lease, answering `kurs.ctl.fetch` with a cycle of its own; or, for one cycle
when nobody holds it, the entry points of `rates.fetch_control` (the django-q2 safety net,
one-shot `run_fetch`, `POST /tasks/run` when no owner answers).

The owner hears item events on NATS: a created (or re-activated) item's pair is quoted at once by
every provider able to quote it, however recently a slow provider (CBR, CoinGecko) was polled.

A failing provider is never fatal: its error is recorded, the others go on, and the cycle ends. An
outage is logged once when it starts and once when it ends (`ProviderMonitor`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone
from nats.aio.msg import Msg

from config.jsonenc import dumps
from rates import metrics, peg_monitor, policy, provider_health, servedlog, services, shards
from rates.board import Entry
from rates.lease import RENEW_EVERY, lease_holder
from rates.provider_health import ProviderMonitor, monitor_for
from rates.providers import (
    Pair,
    Provider,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    Quote,
)
from rates.providers.streaming import crash_reason, stream_forever
from realtime import events, nats
from realtime.nats import Responder

# The fetching process logs under one name, whichever of its modules speaks.
logger = logging.getLogger("rates.fetcher")

# Providers with a freshness window of their own (CoinGecko's 60 s cache, CBR's daily table)
# are polled every quarter of that window in --watch, at most hourly: their data cannot change
# faster, and CoinGecko's public API rate-limits a 5 s poll.
PACE_FRACTION = 0.25
MAX_PACE = 3600.0
# A REST round that outlives this (or half a poll) is abandoned as a timeout, so one slow
# provider cannot hold a cycle (and with it the failover to the next provider).
MAX_ROUND_SECONDS = 10.0


@dataclass
class ProviderRound:
    """One provider's part of a cycle: `status` is "ok" or "error: ..." (as `/providers` shows)."""

    name: str
    status: str
    valid: int = 0
    stored: int = 0
    # Did the provider answer at all (an HTTP error counts; a refused connection does not)?
    reached: bool = True


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
        # one poll plus a second, and its cycle still ends before the next one starts.
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
        # Pairs that appeared since the last cycle: every provider able to quote them is asked
        # in the next one, however recently it was polled (see `pairs`).
        self._new_pairs: set[Pair] = set()
        # Set when an item event arrives (`ItemListener`): the owner reads the pairs at once.
        self._items_changed = asyncio.Event()
        self._reached = False  # has any provider answered this process yet?
        self._holding: frozenset[int] = frozenset()  # with shards: the shards held now
        self._offline_hinted = False
        # The streams' quotes waiting for the owner's next burst (`_accept_streamed`); bounded,
        # so that an owner that falls behind slows the streams' reading, not its own memory.
        self._streamed: asyncio.Queue[tuple[ProviderMonitor, Quote]] = asyncio.Queue(STREAM_BACKLOG)
        # (provider, pair) -> time.monotonic() of its last quote accepted from a stream.
        self._stream_heard: dict[tuple[str, str], float] = {}

    async def pairs(self) -> list[Pair]:
        """The pairs to quote now, read afresh. A pair new since the last read (an item created
        or activated again) starts its first round: its first status waits for every provider
        of this fetcher that can quote it (`QuoteBoard.start_first_round`), and each of them is
        asked for it in the next cycle."""
        pairs = await sync_to_async(_wanted_pairs)(self.quotable)
        board = services.get_board()
        board.set_best_possible(
            {
                pair.code: policy.provider_priority(provider.name)
                for provider in reversed(self.providers)
                for pair in pairs
                if provider.supports(pair)
            }
        )
        known = set(self._pairs)
        new = [pair for pair in pairs if pair not in known]
        if new:
            await sync_to_async(services.adopt_stored)([pair.code for pair in new])
            board.start_first_round(
                {
                    pair.code: {
                        provider.name: policy.provider_priority(provider.name)
                        for provider in self.providers
                        if provider.supports(pair)
                    }
                    for pair in new
                },
                # A round ends within its timeout; this bounds a wait whose round never ran.
                until=time.monotonic() + self.poll_interval + self.round_timeout,
            )
            self._new_pairs.update(new)
        self._pairs = pairs
        return pairs

    def quotable(self, pair: Pair) -> bool:
        """Can one of this fetcher's providers quote the pair directly?"""
        return any(provider.supports(pair) for provider in self.providers)

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
        new, self._new_pairs = self._new_pairs, set()
        polled = [
            provider
            for provider in self.providers
            if not pace or self.due(provider) or any(provider.supports(pair) for pair in new)
        ]
        rounds = await asyncio.gather(*(self._round(provider, pairs) for provider in polled))
        await sync_to_async(_after_cycle)()
        duration = time.perf_counter() - started
        report = CycleReport(
            stored=sum(item.stored for item in rounds),
            providers={item.name: item.status for item in rounds},
            duration_ms=round(duration * 1000),
            valid=sum(item.valid for item in rounds),
        )
        among = frozenset(provider.name for provider in self.providers)
        report.rows = await sync_to_async(_table_rows)(among)
        self.cycles += 1
        self.stored += report.stored
        metrics.FETCH_CYCLES.labels("ok" if report.ok else "failed").inc()
        metrics.FETCH_DURATION.observe(duration)
        board = services.get_board()
        if board.writable():
            event = report.event()
            if board.shards is not None:
                # One event per owner: which shards' pairs this one was (docs/events.md).
                event["shards"] = sorted(board.shards)
            events.publish("fetch.completed", event)
        self._hint_if_offline(rounds)
        return report

    def _hint_if_offline(self, rounds: Sequence[ProviderRound]) -> None:
        """Once: no provider has answered at all, as when Kurs runs with no network. The
        emulator (`make demo`) serves every provider's API locally."""
        self._reached = (
            self._reached
            or any(item.reached for item in rounds)
            or any(monitor_for(provider.name).last_success for provider in self.providers)
        )
        if self._reached or self._offline_hinted or not rounds:
            return
        self._offline_hinted = True
        logger.warning(
            "no provider could be reached (%s): without a network, `make demo` runs Kurs "
            "against the built-in exchange emulator",
            ", ".join(item.name for item in rounds),
        )

    async def _round(self, provider: Provider, pairs: Sequence[Pair]) -> ProviderRound:
        board = services.get_board()
        was_down = provider.name in board.down
        try:
            result = await self._guarded_round(provider, pairs)
        finally:
            waited = board.end_first_round(provider.name, [pair.code for pair in pairs])
        if result.status != "ok" or (provider.name in board.down) != was_down:
            # Fail its pairs over (or back) now, not when the slowest provider's round ends.
            await sync_to_async(services.reevaluate)()
        elif waited:
            # New pairs were waiting for this provider's answer to publish their first status.
            await sync_to_async(services.reevaluate)(pairs=waited)
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
            return ProviderRound(name, f"error: circuit open, retry in {retry:.0f}s", reached=False)
        supported = [pair for pair in pairs if provider.supports(pair)]
        if not supported:
            return ProviderRound(name, "ok")
        try:
            async with asyncio.timeout(self.round_timeout):
                quotes = await provider.fetch(supported)
        except ProviderRateLimited as exc:
            return self._failed(monitor, str(exc), "rate_limited", retry_after=exc.retry_after)
        except ProviderError as exc:
            unreached = isinstance(exc, ProviderConnectionError | ProviderTimeout)
            return self._failed(monitor, str(exc), type(exc).__name__, reached=not unreached)
        except TimeoutError:
            reason = f"timed out after {self.round_timeout:g}s"
            return self._failed(monitor, reason, "timeout", reached=False)
        except Exception as exc:
            # A provider bug must not stop the others or the cycle. The traceback is logged;
            # what `/providers` and the dashboard show is bounded plain text.
            logger.exception("%s: fetch crashed", name)
            return self._failed(monitor, crash_reason(exc), "crash")
        # A pair whose stream delivered within the poll is already confirmed: its REST quote
        # adds nothing (docs/scaling.md#the-owner); it counts as valid, as it is.
        heard = time.monotonic() - self.poll_interval
        fresh = [
            quote
            for quote in quotes
            # Never heard: -inf, not 0.0 (monotonic time counts from boot: within `poll` of
            # it, 0.0 would pass for "heard within the poll" and drop every REST quote).
            if self._stream_heard.get((quote.provider, quote.pair), -math.inf) < heard
        ]
        results = []
        accept = sync_to_async(services.accept_quotes)
        # In bursts of at most BURST_MAX: the streams' bursts take their turn in between.
        for start in range(0, len(fresh), BURST_MAX):
            results += await accept(fresh[start : start + BURST_MAX])
        valid = sum(result.accepted for result in results) + len(quotes) - len(fresh)
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
        reached: bool = True,
    ) -> ProviderRound:
        # The monitor logs it (once per outage, not once per round).
        monitor.failed(reason, kind=kind, retry_after=retry_after)
        return ProviderRound(monitor.name, f"error: {reason}", stored=stored, reached=reached)

    # --- the live owner ----------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event, *, held: shards.Shards | None = None) -> None:
        """Own live state until stopped: wait for the lease, then stream and poll while held.

        A second fetcher waits as a standby and takes over within the lease's TTL when the owner
        dies; an owner that loses its lease (a database outage longer than the TTL) stops writing
        at once and goes back to waiting. With shards (`rates.shards`), each shard's lease is
        such a lease: the fetcher owns the shards it holds, and owns again (`_own`) whenever
        that set changes (a shard lost, or a free one taken).
        """
        held = held or shards.Shards()
        board = services.get_board()
        waiting_logged = False
        # With shards the leases are renewed (and taken) by a task of their own for the whole
        # watch, not by each ownership: a change of shards (the board reloaded, the streams
        # restarted, the writes in flight drained) can outlast a lease's TTL at 1,000 pairs.
        self._holding = frozenset()
        renewer = asyncio.create_task(self._renew(held, stop)) if held.sharded else None
        try:
            while not stop.is_set():
                try:
                    if renewer is None:
                        owned = await sync_to_async(held.take, thread_sensitive=False)()
                    else:
                        owned = self._holding
                    if owned:
                        waiting_logged = False
                        await self._own(held, owned, stop)
                        continue
                    if not waiting_logged:
                        holder = await sync_to_async(lease_holder)(name=held.leases[0].name)
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
            if renewer is not None:
                renewer.cancel()
                with suppress(asyncio.CancelledError):
                    await renewer
            board.guard = no_writes
            shards.disown(board)
            await sync_to_async(held.release)()

    async def _renew(self, held: shards.Shards, stop: asyncio.Event) -> None:
        """With shards: every RENEW_EVERY, renew the leases held and take free ones
        (`Shards.take`); `_holding` is what is held now, `_keep` compares it with what is owned."""
        while not stop.is_set():
            try:
                self._holding = await sync_to_async(held.take, thread_sensitive=False)()
            except DatabaseError as exc:
                logger.warning("owner: database unavailable (%s); retrying", exc)
                await sync_to_async(close_old_connections, thread_sensitive=False)()
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RENEW_EVERY)

    async def _own(self, held: shards.Shards, owned: frozenset[int], stop: asyncio.Event) -> None:
        board = services.get_board()
        shards.own(board, held, owned)
        loaded = await sync_to_async(services.board_load)()
        await sync_to_async(peg_monitor.get_monitor().load)(now=timezone.now())
        board.guard = lambda: held.held(owned)
        # What the previous owner committed but never got onto the stream goes first.
        nats.relay_undelivered()
        servedlog.follow_acks()
        metrics.OWNER_LEASE_HELD.set(1)
        metrics.OWNER_SHARDS_HELD.set(len(owned))
        if held.sharded:
            logger.info(
                "owner: live rates loaded for %d pairs of %s (epochs %s)",
                loaded,
                shards.describe(owned, held.count),
                held.epochs(owned),
            )
        else:
            logger.info(
                "owner: live rates loaded for %d pairs (epoch %s)", loaded, held.leases[0].epoch
            )
        lost, grown = asyncio.Event(), asyncio.Event()
        keeper = asyncio.create_task(self._keep(held, owned, lost, grown, stop))
        responders = serve_fetch_requests(self, held, owned)
        items = ItemListener(self._items_changed)
        try:
            await self._run(stop, lost, grown)
        finally:
            items.close()
            for responder in responders:
                responder.close()
            keeper.cancel()
            with suppress(asyncio.CancelledError):
                await keeper
            board.guard = no_writes
            metrics.OWNER_LEASE_HELD.set(0)
            metrics.OWNER_SHARDS_HELD.set(0)
            if lost.is_set() and not stop.is_set():
                logger.error("owner: lease lost; stopped writing, waiting to take it again")
            elif grown.is_set() and not stop.is_set():
                await self._reshape(held, owned)

    async def _reshape(self, held: shards.Shards, owned: frozenset[int]) -> None:
        """The set of shards changes: a free one was taken, or this owner holds more than its
        fair share and gives the surplus up, once no write of its is in flight (the release
        queues behind them in the writes' thread), so that a successor never writes beside it."""
        surplus = held.surplus(owned)
        if surplus:
            await sync_to_async(held.release)(surplus)
            self._holding = self._holding - surplus
            logger.info(
                "owner: gave up %s for a fetcher with fewer",
                shards.describe(surplus, held.count),
            )
        else:
            logger.info("owner: took a free shard; owning again with it")

    async def _keep(
        self,
        held: shards.Shards,
        owned: frozenset[int],
        lost: asyncio.Event,
        grown: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        """Every TICK: renew the leases when due (and, with shards, take a free one: `grown`),
        re-decide pairs (time passes), save statuses."""
        renewed = time.monotonic()
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)
            if time.monotonic() - renewed >= RENEW_EVERY:
                if held.sharded:
                    now_held = self._holding  # renewed by `_renew`
                else:
                    renew = sync_to_async(held.renew, thread_sensitive=False)
                    now_held = owned if await renew(owned) else frozenset()
                if not owned <= now_held:
                    lost.set()
                    return
                if now_held != owned or held.surplus(owned):
                    grown.set()  # own again with what is held now, less any surplus
                    return
                renewed = time.monotonic()
            try:
                await sync_to_async(_after_cycle)()
            except Exception:
                logger.exception("owner: re-evaluating the current rates failed")

    async def _run(self, stop: asyncio.Event, *ends: asyncio.Event) -> None:
        """Streams from every streaming provider plus a REST cycle every poll interval.

        The set of pairs is re-read each cycle, and at once when an item event arrives: a new
        pair starts a cycle of its own (its first round) and the streams resubscribe.
        """
        streams: list[asyncio.Task[None]] = []
        stream_stop = asyncio.Event()
        streamed: list[Pair] = []
        ended = asyncio.create_task(_first_of(stop, *ends))
        self._streamed = asyncio.Queue(STREAM_BACKLOG)  # this loop's: none left from the last
        accepting = asyncio.create_task(self._accept_streamed())
        last_started = due = time.monotonic()
        try:
            while not ended.done():
                pairs = None
                if await self._wait(ended, due):
                    # An item changed: a cycle now (not before WAKE_GAP after the last one, so
                    # that a burst of item writes cannot multiply the calls to the exchanges),
                    # if the pairs changed; else the cadence goes on.
                    await self._wait(ended, last_started + WAKE_GAP, wake=False)
                    if ended.done():
                        break
                    try:
                        pairs = await self.pairs()
                    except Exception:
                        logger.exception("reading the items failed")
                        continue
                    if pairs == streamed:
                        continue
                if ended.done():
                    break
                last_started = time.monotonic()
                # A steady cadence: the next cycle starts one interval after this one started.
                due = last_started + self.poll_interval
                try:
                    if pairs is None:
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
        finally:
            ended.cancel()
            await _stop_streams(streams, stream_stop)
            accepting.cancel()
            with suppress(asyncio.CancelledError):
                await accepting

    async def _wait(self, ended: asyncio.Task[None], until: float, *, wake: bool = True) -> bool:
        """Wait until the monotonic time `until`, or the end; True when an item event (with
        `wake`) cut it short."""
        pause = until - time.monotonic()
        if pause <= 0:
            return False
        waits: set[asyncio.Future[Any]] = {ended}
        woken = asyncio.ensure_future(self._items_changed.wait()) if wake else None
        if woken is not None:
            waits.add(woken)
        try:
            await asyncio.wait(waits, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if woken is not None:
                woken.cancel()
        if woken is not None and self._items_changed.is_set():
            self._items_changed.clear()
            return True
        return False

    async def _accept_streamed(self) -> None:
        """The streams' quotes, a burst at a time: whatever arrived while the last burst was
        being written (no waiting to fill one: a lone tick is a burst of one), decided in turn
        and written in one transaction (`services.accept_quotes`)."""
        accept = sync_to_async(services.accept_quotes)
        queue = self._streamed
        while True:
            burst = [await queue.get()]
            while len(burst) < BURST_MAX and not queue.empty():
                burst.append(queue.get_nowait())
            try:
                results = await accept([quote for _, quote in burst])
            except Exception:
                # A bug: the burst is lost, the streams (and the next burst) go on.
                logger.exception("cannot accept a burst of %d streamed quotes", len(burst))
                continue
            now = time.monotonic()
            for (monitor, quote), result in zip(burst, results, strict=True):
                if result.accepted:  # a stream of rejected quotes (absurd prices) is no source
                    monitor.stream_quote()
                    self._stream_heard[(quote.provider, quote.pair)] = now
                self.stored += result.stored_count

    async def _stream(self, provider: Provider, pairs: list[Pair], stop: asyncio.Event) -> None:
        monitor = monitor_for(provider.name)

        async def on_quote(quote: Quote) -> None:
            await self._streamed.put((monitor, quote))

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
# The most quotes one burst writes in one transaction (streamed quotes, a REST round's share):
# a REST round of 1,000 pairs must not hold the streams' ticks for the whole of its write.
BURST_MAX = 200
# Streamed quotes that may wait for the owner before the streams stop reading.
STREAM_BACKLOG = 5 * BURST_MAX
# The least time between the starts of two cycles when an item event asks for one early.
WAKE_GAP = 0.5
# The owner's clock: lease renewal when due, pairs decided again (a quote outlives its window, a
# stream falls silent). A quarter second keeps that well inside "one poll plus a second".
TICK = 0.25
# A requested cycle this recent answers a new request (see Fetcher.cycle_now).
REQUEST_REUSE = 2.0


def no_writes() -> bool:
    """The board's guard while this process does not own live state: nothing is written."""
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


def _wanted_pairs(quotable: Callable[[Pair], bool]) -> list[Pair]:
    # A long-running fetcher outlives database restarts: drop a broken (or, with CONN_MAX_AGE
    # 0, any) connection once per cycle, as Django does between requests, so the next query
    # reconnects instead of failing forever.
    close_old_connections()
    # Read afresh, not from the items cache: a new item is quoted in the cycle that follows.
    services.get_board().forget_items()
    return services.wanted_pairs(services.active_items(), quotable=quotable)


def _after_cycle() -> None:
    """Time passed: measure the pegs, decide every pair again, then save what changed in
    provider statuses and peg states."""
    provider_health.check_all_quiet()
    board, pegs = services.get_board(), peg_monitor.get_monitor()
    pegs.evaluate(board, now=timezone.now())
    services.reevaluate()
    provider_health.flush_statuses()
    pegs.flush(board)


def _table_rows(among: frozenset[str]) -> list[dict[str, Any]]:
    """Pair, value, provider and age of every active item as this fetcher's providers quote it
    (`run_fetch --provider binance` shows Binance's rates, not those the owner stored from
    others); a pair they cannot quote is listed without a value only when every configured
    provider was asked."""
    board = services.get_board()
    now = timezone.now()
    every = among.issuperset(settings.KURS_PROVIDERS)
    rows = []
    for code in sorted(services.active_items(board=board)):
        entry: Entry | None = board.best(code, now=now, among=among)
        if entry is None and not every:
            continue
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


# --- POST /tasks/run through the owner -------------------------------------------------------
def control_subject(shard: int | None = None) -> str:
    """`<prefix>.ctl.fetch`; with shards, `<prefix>.ctl.fetch.<shard>`, answered by its owner."""
    base = f"{settings.KURS_NATS_PREFIX}.ctl.fetch"
    return base if shard is None else f"{base}.{shard}"


class ItemListener:
    """Item events on NATS (`<prefix>.items.>`, from whichever process wrote the item) set
    `changed` on the owner's loop; without NATS the owner still reads the items every poll."""

    def __init__(self, changed: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        async def heard(_msg: Msg) -> None:
            with suppress(RuntimeError):  # the owner's loop ended with a message in flight
                loop.call_soon_threadsafe(changed.set)

        self._sub_id, _ = nats.connection.subscribe(f"{settings.KURS_NATS_PREFIX}.items.>", heard)

    def close(self) -> None:
        nats.connection.unsubscribe(self._sub_id)


def serve_fetch_requests(
    fetcher: Fetcher, held: shards.Shards, owned: frozenset[int]
) -> list[Responder]:
    """Answer `kurs.ctl.fetch` with a cycle of this owner's, for as long as it owns; with shards,
    the subject of each shard owned, the answer naming this owner (`owner`), so that the asker
    counts once an owner that answers for several shards (`rates.fetch_control`)."""
    loop = asyncio.get_running_loop()

    async def handle(payload: bytes) -> bytes:
        future = asyncio.run_coroutine_threadsafe(fetcher.cycle_now(), loop)
        report = await asyncio.wrap_future(future)
        answer = report.event()
        if held.sharded:
            answer = {**answer, "owner": held.holder, "shards": sorted(owned)}
        return dumps(answer).encode()

    if not held.sharded:
        return [nats.serve(control_subject(), handle)]
    return [nats.serve(control_subject(shard), handle) for shard in sorted(owned)]
