"""`GET /api/v1/items/{id}` from memory, for the ASGI fast path (`config/fastpath.py`).

The ninja route (`items.api.get_item`, the documented definition) reads the item and its
`CurrentRate` row from the database on every request: two queries and a connection, most of its
cost. This cache keeps what those queries return, per item, and an entry stands only while:

- no item event has arrived since it was read (`snapshot.items_generation`: any
  `item.created|updated|deleted` clears every entry at once; items change rarely);
- the snapshot knows no newer version of the pair's current rate than the row read (the live
  owner bumps `version` on every write of the row and publishes `rate.updated` after commit);
- it is younger than MAX_AGE_S: the bound when events are lost (NATS and the fallback bus both
  down), the `max-age` `/courses` advertises as well;
- `invalidate()` was not called since (the fast path calls it after every write request it hands
  to Django in this process, so a client reads its own write before the event comes back).

Concurrent misses for one item share one read. Status and age are judged per request, exactly as
the route does (`rates.selectors.current_rate_view`), so the two give the same answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from items.models import Item
from items.selectors import item_fields
from rates.models import CurrentRate
from rates.selectors import current_rate_view
from rates.snapshot import snapshot

MAX_AGE_S = 1.0
# Items held at most; past it the cache starts over (a client walking ids costs reads, not memory).
MAX_ENTRIES = 4096


class VersionSource(Protocol):
    """What the cache checks entries against: `rates.snapshot.RatesSnapshot`."""

    @property
    def items_generation(self) -> int: ...

    def version_of(self, code: str) -> int: ...


@dataclass(frozen=True, slots=True)
class ItemEntry:
    """What the route reads for one item; a new entry after every read."""

    item: dict[str, Any]
    row: CurrentRate | None
    generation: tuple[int, int]  # (snapshot items generation, local generation) when read
    read_at: float

    def view(self, now: datetime) -> dict[str, Any]:
        """What the route answers: the item's fields and `latest`, judged at `now`."""
        row = self.row
        return {**self.item, "latest": None if row is None else current_rate_view(row, now=now)}


def _read(item_id: int) -> tuple[dict[str, Any], CurrentRate | None] | None:
    """The item's fields and current rate row, or None when there is no such item (sync)."""
    try:
        item = Item.objects.filter(pk=item_id).first()
        if item is None:
            return None
        return item_fields(item), CurrentRate.objects.filter(item_id=item_id).first()
    finally:
        # Outside a request nothing else closes this thread's connection (CONN_MAX_AGE applies).
        close_old_connections()


class ItemDetailCache:
    def __init__(
        self,
        source: VersionSource,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_age_s: float = MAX_AGE_S,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._source = source
        self._clock = clock
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._local_generation = 0
        self._entries: dict[int, ItemEntry] = {}
        # Keyed by generation too: a request that comes after a write never joins an older read.
        self._inflight: dict[tuple[Any, ...], asyncio.Task[ItemEntry | None]] = {}
        self.reads = 0  # database reads: tests watch reuse with it

    def invalidate(self) -> None:
        """Forget every entry (a write went through this process)."""
        self._local_generation += 1
        self._entries.clear()

    async def get(self, item_id: int, *, now: datetime) -> dict[str, Any] | None:
        """What the route answers for the item (its fields and `latest`), or None if none."""
        entry = await self.entry(item_id)
        return None if entry is None else entry.view(now)

    async def entry(self, item_id: int) -> ItemEntry | None:
        """The item's standing entry (read now if there is none), or None if no such item."""
        entry = self._entries.get(item_id)
        if entry is None or not self._stands(entry):
            entry = await self._load(item_id)
        return entry

    def _generation(self) -> tuple[int, int]:
        return (self._source.items_generation, self._local_generation)

    def _stands(self, entry: ItemEntry) -> bool:
        version = 0 if entry.row is None else entry.row.version
        return (
            entry.generation == self._generation()
            and self._source.version_of(entry.item["code"]) <= version
            and self._clock() - entry.read_at < self._max_age_s
        )

    async def _load(self, item_id: int) -> ItemEntry | None:
        loop = asyncio.get_running_loop()
        key = (loop, item_id, self._generation())
        task = self._inflight.get(key)
        if task is None:
            task = loop.create_task(self._read(item_id), name=f"item-detail-{item_id}")
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # Shielded: a client that disconnects must not cancel the read the others wait on.
        return await asyncio.shield(task)

    async def _read(self, item_id: int) -> ItemEntry | None:
        generation, started = self._generation(), self._clock()
        self.reads += 1
        found = await sync_to_async(_read)(item_id)
        if found is None:
            return None
        entry = ItemEntry(item=found[0], row=found[1], generation=generation, read_at=started)
        # Kept only if nothing was invalidated meanwhile (a write may have raced the read).
        if generation == self._generation():
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[item_id] = entry
        return entry


# The process's one cache, fed by the same snapshot as `/courses`.
item_details = ItemDetailCache(snapshot)
