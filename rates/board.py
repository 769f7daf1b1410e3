"""The in-process quote board: what each provider last said about each pair, and who serves it.

`rates.services.accept_quote` is the only writer. The board answers the questions validation and
failover ask within one process: the last accepted value of a pair (the jump reference), whether
another provider confirms a jump, which provider serves a pair now, and what was last published.
The database stays the shared truth between processes (history, and the reference after a start).

Sync code on several threads may use it (sync_to_async workers, the event loop), hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from rates.validation import relative_change

DERIVED_SEPARATOR = "+"


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

    @property
    def sources(self) -> list[str]:
        """The real providers behind the entry (two for a cross rate `binance+cbr`)."""
        return self.provider.split(DERIVED_SEPARATOR)


@dataclass(slots=True)
class _Published:
    provider: str
    value: Decimal
    at: float


@dataclass
class QuoteBoard:
    # pair -> provider -> entry
    candidates: dict[str, dict[str, Entry]] = field(default_factory=dict)
    accepted: dict[str, dict[str, Entry]] = field(default_factory=dict)
    references: dict[str, Decimal] = field(default_factory=dict)
    seeded: set[str] = field(default_factory=set)
    # (pair, provider) -> (level, since): an unconfirmed jump being held (see `held`).
    pending: dict[tuple[str, str], tuple[Decimal, datetime]] = field(default_factory=dict)
    published: dict[str, _Published] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    # Active items: code -> id, refreshed by rates.services when older than its TTL.
    items: dict[str, int] = field(default_factory=dict)
    items_loaded_at: float | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def offer(self, pair: str, entry: Entry) -> None:
        """A plausible quote (valid apart from the jump guard): it may confirm other providers."""
        with self._lock:
            self.candidates.setdefault(pair, {})[entry.provider] = entry

    def accept(self, pair: str, entry: Entry) -> None:
        with self._lock:
            self.accepted.setdefault(pair, {})[entry.provider] = entry
            self.references[pair] = entry.value

    def reference(self, pair: str) -> Decimal | None:
        with self._lock:
            return self.references.get(pair)

    def seed_once(self, pair: str) -> bool:
        """True the first time only: the database reference is looked up once per pair."""
        with self._lock:
            if pair in self.seeded:
                return False
            self.seeded.add(pair)
            return True

    def set_reference(self, pair: str, value: Decimal) -> None:
        with self._lock:
            self.references.setdefault(pair, value)

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
            return self.accepted.get(pair, {}).pop(provider, None) is not None

    def best(self, pair: str, *, now: datetime, direct_only: bool = False) -> Entry | None:
        """The entry that serves `pair`: fresh, from a provider that is up, highest priority."""
        with self._lock:
            entries = list(self.accepted.get(pair, {}).values())
            down = set(self.down)
        usable = [
            entry
            for entry in entries
            if entry.fresh_until >= now
            and not down.intersection(entry.sources)
            and not (direct_only and entry.derived)
        ]
        return min(usable, key=lambda entry: entry.priority, default=None)

    def should_publish(self, pair: str, entry: Entry, *, heartbeat: float) -> bool:
        """Publish a new value, a provider change, or a heartbeat so readers see it is fresh."""
        with self._lock:
            last = self.published.get(pair)
        return (
            last is None
            or last.provider != entry.provider
            or last.value != entry.value
            or time.monotonic() - last.at >= heartbeat
        )

    def mark_published(self, pair: str, entry: Entry) -> None:
        with self._lock:
            self.published[pair] = _Published(entry.provider, entry.value, time.monotonic())

    def set_down(self, provider: str, down: bool) -> bool:
        """Mark a provider down (its quotes stop serving) or up; True when that changed."""
        with self._lock:
            if down == (provider in self.down):
                return False
            if down:
                self.down.add(provider)
            else:
                self.down.discard(provider)
            return True

    def served_by(self, provider: str) -> list[str]:
        """Item pairs whose last published rate came (partly) from `provider`."""
        with self._lock:
            return [
                pair
                for pair, last in self.published.items()
                if provider in last.provider.split(DERIVED_SEPARATOR)
            ]

    def forget_items(self) -> None:
        with self._lock:
            self.items_loaded_at = None

    def set_items(self, items: Iterable[tuple[str, int]]) -> None:
        with self._lock:
            self.items = dict(items)
            self.items_loaded_at = time.monotonic()
