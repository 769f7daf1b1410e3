"""The owner's quote board: what each provider last said about each pair, and who serves it.

Only the live owner (docs/architecture.md#one-owner-of-live-state) keeps a board that writes: the
fetcher while it holds the lease, or the safety net for one cycle. It starts from the stored
current rates (`load`), so a restart or a hand-over neither flips a pair to another provider nor
forgets the jump guard's reference. `rates.services` is its only writer; everything it answers
is a pure function of its state and `now`.

Sync code on several threads may use it (sync_to_async workers, the event loop), hence the lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings

from rates import policy
from rates.validation import relative_change

DERIVED_SEPARATOR = policy.DERIVED_SEPARATOR


def agrees(value: Decimal, other: Decimal, *, max_jump: float) -> bool:
    """Two values within the jump limit of each other (relative to the second)."""
    return other > 0 and relative_change(value, other) <= Decimal(str(max_jump))


@dataclass(frozen=True, slots=True)
class Entry:
    """One provider's latest view of one pair, as accepted (or offered) to the board."""

    provider: str
    value: Decimal
    source_time: datetime
    fresh_until: datetime
    priority: tuple[int, ...]
    bid: Decimal | None = None
    ask: Decimal | None = None
    derived: bool = False
    proxied: bool = False
    # A cross rate's legs: [{"pair", "provider", "value", "source_time"}] (docs/api.md#json-shapes).
    route: tuple[dict[str, Any], ...] = ()

    @property
    def sources(self) -> list[str]:
        """The real providers behind the entry (two for a cross rate `binance+cbr`)."""
        return self.provider.split(DERIVED_SEPARATOR)

    @property
    def checked_at(self) -> datetime:
        """The confirmation time that `rates.policy.is_stale` turns into this entry's expiry."""
        return self.fresh_until - timedelta(seconds=policy.provider_freshness(self.provider))


@dataclass(frozen=True, slots=True)
class Current:
    """The pair's current rate as the owner last wrote and published it (a CurrentRate row)."""

    provider: str
    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    source_time: datetime
    checked_at: datetime
    received_at: datetime
    derived: bool
    route: tuple[dict[str, Any], ...]
    status: str
    version: int
    # The evidence (docs/rates.md#consensus-pricing): `priority` or `consensus`, how many sources
    # the value rests on, how far they disagree, and every source considered as the payloads
    # show it ({"provider", "value", "bid", "ask", "source_time", "excluded", "reason"}).
    mode: str = policy.PRIORITY
    n_sources: int = 1
    dispersion_bps: Decimal | None = None
    sources: tuple[dict[str, Any], ...] = ()
    # time.monotonic() of the last write, for the confirmation throttle; -inf: not written by
    # this process (loaded), so a confirmation is due at once. Not 0.0: monotonic time counts
    # from boot, and an owner started within a heartbeat of boot would hold it back.
    written: float = -math.inf

    def same_rate(self, entry: Entry) -> bool:
        return self.provider == entry.provider and self.value == entry.value

    @property
    def excluded_providers(self) -> frozenset[str]:
        """The sources this rate's pricing left out as outliers."""
        return frozenset(
            source["provider"] for source in self.sources if source.get("reason") == "outlier"
        )


@dataclass(frozen=True, slots=True)
class PairState:
    """One pair as the board holds it at `now`, read under one lock: what `decide` needs."""

    # Fresh entries of providers that are up, best priority first (direct before cross rates).
    usable: tuple[Entry, ...]
    current: Current | None
    # The best priority that could serve the pair (`expected_priority`).
    expected: tuple[int, ...] | None
    # A new pair's first round: the priorities of the providers not yet heard from.
    awaited: tuple[tuple[int, ...], ...]
    # The item's pricing (`priority` or `consensus`), KURS_PRICING applied.
    mode: str

    def best(self, *, direct_only: bool = False) -> Entry | None:
        for entry in self.usable:
            if not (direct_only and entry.derived):
                return entry
        return None

    def awaits_better(self, priority: tuple[int, ...] | None) -> bool:
        """Waiting, in its first round, for a provider that outranks `priority` (any: None)?"""
        if not self.awaited:
            return False
        return priority is None or any(rank < priority for rank in self.awaited)


@dataclass
class QuoteBoard:
    # pair -> provider -> entry
    candidates: dict[str, dict[str, Entry]] = field(default_factory=dict)
    accepted: dict[str, dict[str, Entry]] = field(default_factory=dict)
    references: dict[str, Decimal] = field(default_factory=dict)
    # (pair, provider) -> (level, since): an unconfirmed jump being held (see `held`).
    pending: dict[tuple[str, str], tuple[Decimal, datetime]] = field(default_factory=dict)
    # pair -> the current rate as written (the owner's copy of the CurrentRate rows).
    current: dict[str, Current] = field(default_factory=dict)
    # (pair, provider) -> (value, received_at) of the last history row written.
    last_stored: dict[tuple[str, str], tuple[Decimal, datetime]] = field(default_factory=dict)
    # pair -> the best priority among providers able to quote it (set by the fetcher).
    best_possible: dict[str, tuple[int, ...]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    # A new pair's first round (see `start_first_round`): pair -> provider -> (its priority,
    # time.monotonic() after which it is no longer waited for).
    first_round: dict[str, dict[str, tuple[tuple[int, ...], float]]] = field(default_factory=dict)
    # Active items: code -> id, and code -> pricing (null: KURS_PRICING), refreshed by
    # rates.services when older than its TTL.
    items: dict[str, int] = field(default_factory=dict)
    pricing: dict[str, str | None] = field(default_factory=dict)
    # The cross routes of the active items by leg, built by rates.services when first asked
    # after the set of items changed (None: to build): (the USD proxy it was built for, leg code
    # -> [(item code, first leg, second leg)]).
    routes_by_leg: tuple[str, dict[str, list[tuple[str, Any, Any]]]] | None = None
    items_loaded_at: float | None = None
    # The owner's sweep (`rates.services.reevaluate`): pair -> (the instant before which
    # deciding it again without news cannot change anything, the `generation` that held then).
    # A pair's own news (a quote, a write) forgets its entry; anything that may move every
    # pair (a provider down, the items, a first round) starts a new generation.
    quiet: dict[str, tuple[datetime, Any]] = field(default_factory=dict)
    generation: int = 0
    # May this board write and publish? The owner's lease check; None: always (tests, benches).
    guard: Callable[[], bool] | None = None
    # With sharded ownership (rates.shards): is an item's pair in this owner's shards (its items
    # are the only ones it writes), and does it do the global duties (pegs, provider statuses)?
    # None: every pair, and the global duties with any write (one shard).
    owns: Callable[[str], bool] | None = None
    duty: Callable[[], bool] | None = None
    # ... and which shards those are (None: one shard, or not an owner of shards).
    shards: frozenset[int] | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # --- ownership ---------------------------------------------------------------------------
    def writable(self) -> bool:
        return self.guard is None or self.guard()

    def owned(self, pair: str) -> bool:
        return self.owns is None or self.owns(pair)

    def global_writable(self) -> bool:
        """May this board publish and save what is not about one pair (peg states, provider
        statuses)? Its owner holds the global shard (rates.shards.GLOBAL_SHARD)."""
        return self.writable() and (self.duty is None or self.duty())

    def load(self, rows: Iterable[tuple[str, Current]]) -> None:
        """Start from the stored current rates: each serves on, and is the jump reference."""
        with self._lock:
            self.generation += 1
            for pair, current in rows:
                self.current[pair] = current
                self.references[pair] = current.value
                if current.provider == policy.CONSENSUS_PROVIDER:
                    continue  # a median is no source: the providers' next quotes are
                entry = Entry(
                    provider=current.provider,
                    value=current.value,
                    source_time=current.source_time,
                    fresh_until=policy.fresh_until(current.provider, current.checked_at),
                    priority=policy.provider_priority(current.provider),
                    bid=current.bid,
                    ask=current.ask,
                    derived=current.derived,
                    route=current.route,
                )
                self.accepted.setdefault(pair, {})[current.provider] = entry

    def clear(self) -> None:
        """Forget everything (before loading as a new owner)."""
        with self._lock:
            self.generation += 1
            self.quiet.clear()
            for table in (
                self.candidates,
                self.accepted,
                self.references,
                self.pending,
                self.current,
                self.last_stored,
                self.best_possible,
                self.first_round,
            ):
                table.clear()
            self.down.clear()
            self.items_loaded_at = None
            self.routes_by_leg = None

    # --- quotes ----------------------------------------------------------------------------
    def offer(self, pair: str, entry: Entry) -> None:
        """A plausible quote (valid apart from the jump guard): it may confirm other providers."""
        with self._lock:
            self.quiet.pop(pair, None)
            self.candidates.setdefault(pair, {})[entry.provider] = entry

    def accept(self, pair: str, entry: Entry) -> None:
        with self._lock:
            self.quiet.pop(pair, None)
            self.accepted.setdefault(pair, {})[entry.provider] = entry
            self.references[pair] = entry.value

    def reference(self, pair: str) -> Decimal | None:
        with self._lock:
            return self.references.get(pair)

    def confirmations(self, pair: str, entry: Entry, *, now: datetime) -> list[Decimal]:
        """Other providers' fresh values for the pair: second opinions for the jump guard.

        A cross rate counts unless one of its legs is the provider itself.
        """
        with self._lock:
            others = list(self.candidates.get(pair, {}).values())
        return [
            other.value
            for other in others
            if other.fresh_until >= now and not set(other.sources) & set(entry.sources)
        ]

    def held(
        self, pair: str, entry: Entry, *, now: datetime, hold: timedelta, max_jump: float
    ) -> bool:
        """Has `entry`'s provider kept reporting this level (within `max_jump`) for `hold`?

        Each call records the level; one that moves away starts the clock again.
        """
        key = (pair, entry.provider)
        with self._lock:
            since = self.pending.get(key)
            if since is None or not agrees(entry.value, since[0], max_jump=max_jump):
                self.pending[key] = (entry.value, now)
                return False
            if now - since[1] < hold:
                return False
            del self.pending[key]
            return True

    def withdraw(self, pair: str, provider: str) -> bool:
        """Drop a provider's accepted quote for a pair (it just sent an invalid one)."""
        with self._lock:
            self.quiet.pop(pair, None)
            return self.accepted.get(pair, {}).pop(provider, None) is not None

    # --- who serves ---------------------------------------------------------------------------
    def best(
        self,
        pair: str,
        *,
        now: datetime,
        direct_only: bool = False,
        among: frozenset[str] | None = None,
    ) -> Entry | None:
        """The entry that serves `pair`: fresh, from a provider that is up, highest priority
        (and, with `among`, from those providers alone, a cross rate's legs included)."""
        with self._lock:
            entries = list(self.accepted.get(pair, {}).values())
            down = set(self.down)
        usable = [
            entry
            for entry in entries
            if entry.fresh_until >= now
            and not down.intersection(entry.sources)
            and not (direct_only and entry.derived)
            and (among is None or among.issuperset(entry.sources))
        ]
        return min(usable, key=lambda entry: entry.priority, default=None)

    def state(self, pair: str, *, now: datetime) -> PairState:
        """Everything `rates.services.decide` reads about `pair`, in one locked read."""
        monotonic = time.monotonic()
        with self._lock:
            entries = list(self.accepted.get(pair, {}).values())
            down = set(self.down)
            current = self.current.get(pair)
            expected = self._expected_priority(pair)
            awaited = self._awaited(pair, monotonic)
            mode = self.pricing.get(pair) or settings.KURS_PRICING
        usable = sorted(
            (
                entry
                for entry in entries
                if entry.fresh_until >= now and not down.intersection(entry.sources)
            ),
            key=lambda entry: entry.priority,
        )
        return PairState(tuple(usable), current, expected, awaited, mode)

    def _awaited(self, pair: str, monotonic: float) -> tuple[tuple[int, ...], ...]:
        awaited = self.first_round.get(pair)
        if not awaited:
            return ()
        for name, (_, until) in list(awaited.items()):
            if until < monotonic:  # a round that never ended (cancelled) holds nothing for long
                del awaited[name]
        if not awaited:
            del self.first_round[pair]
        return tuple(rank for rank, _ in awaited.values())

    def expected_priority(self, pair: str) -> tuple[int, ...] | None:
        with self._lock:
            return self._expected_priority(pair)

    def _expected_priority(self, pair: str) -> tuple[int, ...] | None:
        """The best priority that could serve `pair`: a provider that quotes it, or has."""
        known = [entry.priority for entry in self.accepted.get(pair, {}).values()]
        known += [entry.priority for entry in self.candidates.get(pair, {}).values()]
        possible = self.best_possible.get(pair)
        if possible is not None:
            known.append(possible)
        return min(known, default=None)

    def set_best_possible(self, priorities: dict[str, tuple[int, ...]]) -> None:
        with self._lock:
            if priorities != self.best_possible:
                self.generation += 1
            self.best_possible = dict(priorities)

    # --- a new pair's first round -------------------------------------------------------------
    def start_first_round(
        self, providers: dict[str, dict[str, tuple[int, ...]]], *, until: float
    ) -> None:
        """New pairs (pair -> provider -> priority of each provider that can quote it): until
        each of those providers has answered or failed (`end_first_round`), or `until` passes,
        only a `live` decision is news for the pair (see `awaits_better`). A second provider's
        stream answering first must not publish a `failover` that the next moment corrects."""
        with self._lock:
            self.generation += 1
            for pair, awaited in providers.items():
                self.first_round[pair] = {name: (rank, until) for name, rank in awaited.items()}

    def end_first_round(self, provider: str, pairs: Iterable[str]) -> list[str]:
        """`provider`'s round over `pairs` ended; the pairs that were waiting for it."""
        ended = []
        with self._lock:
            self.generation += 1
            for pair in pairs:
                awaited = self.first_round.get(pair)
                if awaited is None or awaited.pop(provider, None) is None:
                    continue
                ended.append(pair)
                if not awaited:
                    del self.first_round[pair]
        return ended

    def awaits_better(self, pair: str, priority: tuple[int, ...] | None) -> bool:
        """Is `pair` in its first round, waiting for a provider that outranks `priority` (any
        provider when None: nothing serves yet)?"""
        with self._lock:
            awaited = self._awaited(pair, time.monotonic())
        return bool(awaited) and (priority is None or any(rank < priority for rank in awaited))

    def is_quiet(self, pair: str, now: datetime, generation: Any) -> bool:
        """Was `pair` found quiet past `now` in this generation (`quiet`)?"""
        with self._lock:
            found = self.quiet.get(pair)
        return found is not None and found[1] == generation and now < found[0]

    def set_quiet(self, pair: str, until: datetime, generation: Any) -> None:
        with self._lock:
            self.quiet[pair] = (until, generation)

    def pairs(self) -> list[str]:
        """Every pair the board has a current rate or a quote for."""
        with self._lock:
            return sorted(set(self.current) | set(self.accepted))

    def get_current(self, pair: str) -> Current | None:
        with self._lock:
            return self.current.get(pair)

    def adopt_current(self, pair: str, current: Current) -> None:
        """A stored current rate this owner has not loaded (an item activated again): later
        writes continue its `version`, so readers that know it take them as newer."""
        with self._lock:
            self.quiet.pop(pair, None)
            self.current.setdefault(pair, current)

    def set_current(self, pair: str, current: Current) -> None:
        with self._lock:
            self.quiet.pop(pair, None)
            self.current[pair] = replace(current, written=time.monotonic())

    def restore_current(self, pair: str, current: Current | None) -> None:
        """Put back what a rolled-back write replaced (`rates.services.Writes`)."""
        with self._lock:
            self.quiet.pop(pair, None)
            if current is None:
                self.current.pop(pair, None)
            else:
                self.current[pair] = current

    def drop_current(self, pair: str) -> None:
        """Forget a pair whose item is gone (a new item of the same code starts afresh)."""
        with self._lock:
            self.quiet.pop(pair, None)
            self.current.pop(pair, None)
            for key in [key for key in self.last_stored if key[0] == pair]:
                del self.last_stored[key]
            self.accepted.pop(pair, None)
            self.candidates.pop(pair, None)

    def set_down(self, provider: str, down: bool) -> bool:
        """Mark a provider down (its quotes stop serving) or up; True when that changed."""
        with self._lock:
            if down == (provider in self.down):
                return False
            self.generation += 1
            if down:
                self.down.add(provider)
            else:
                self.down.discard(provider)
            return True

    # --- active items ------------------------------------------------------------------------
    def forget_items(self) -> None:
        with self._lock:
            self.items_loaded_at = None

    def set_items(self, items: Iterable[tuple[str, int, str | None]]) -> None:
        """The active items as (code, id, pricing); with shards, those of this owner's."""
        with self._lock:
            rows = [row for row in items if self.owned(row[0])]
            if {code for code, _, _ in rows} != self.items.keys():
                self.routes_by_leg = None
            if {code: pricing for code, _, pricing in rows} != self.pricing:
                self.generation += 1
            self.items = {code: item_id for code, item_id, _ in rows}
            self.pricing = {code: pricing for code, _, pricing in rows}
            self.items_loaded_at = time.monotonic()
