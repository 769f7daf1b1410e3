"""`GET /api/v1/items/{id}`: the one handler of both entrances, and its cache.

`item_details.answer(item_id)` reads the item and its `CurrentRate` row and renders the answer;
the edge's route table (`edge.routes`) calls it with the cache, the ninja route
(`items.api.get_item`, the documented definition) without (`fresh=True`: two queries and a
connection, the cost the cache saves). A cache entry stands only while:

- no item event has arrived since it was read (`snapshot.items_generation`: any
  `item.created|updated|deleted` clears every entry at once; items change rarely);
- the snapshot knows no newer version of the pair's current rate than the row read (the live
  owner bumps `version` on every write of the row and publishes `rate.updated` after commit);
- it is younger than MAX_AGE_S: the bound when events are lost (NATS and the fallback bus both
  down), the `max-age` `/courses` advertises as well;
- `invalidate()` was not called since: every item event this process publishes calls it (the
  API's and the admin's writes go through `items.services`, which publish after commit), so a
  client reads its own write before the event comes back through NATS.

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
from django.utils import timezone

from edge.answer import Answer, json_answer
from items.exceptions import ItemNotFound
from items.models import Item
from items.selectors import item_fields
from rates.models import CurrentRate
from rates.schemas import ItemDetailOut
from rates.selectors import current_rate_view
from rates.snapshot import snapshot
from realtime import events

MAX_AGE_S = 1.0
# Items held at most; past it the cache starts over (a client walking ids costs reads, not memory).
MAX_ENTRIES = 4096
_MAX_ID = 2**63 - 1  # BigAutoField: a larger id cannot exist (items.selectors.item_get)


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

    def view(self, now: datetime, *, expand: bool = False) -> dict[str, Any]:
        """What the route answers: the item's fields and `latest`, judged at `now` (with its
        `sources` when `expand`)."""
        row = self.row
        latest = (
            None
            if row is None
            else current_rate_view(row, now=now, expand=expand, markup_bps=self.item["markup_bps"])
        )
        return {**self.item, "latest": latest}


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
        # The dumped answer per entry: only `latest`'s age and status change between requests.
        self._dumped: dict[int, tuple[ItemEntry, dict[str, Any]]] = {}
        self.reads = 0  # database reads: tests watch reuse with it

    async def answer(self, item_id: int, *, fresh: bool = False, expand: bool = False) -> Answer:
        """200 with the item and its current rate judged now; ItemNotFound when there is none.

        `fresh` reads the database whatever the cache holds (and keeps what it read); `expand`
        lists the rate's sources (each with its age now: validated per request).
        """
        if not 0 < item_id <= _MAX_ID:
            raise ItemNotFound(f"item {item_id} not found")
        entry = await (self._load(item_id) if fresh else self.entry(item_id))
        if entry is None:
            raise ItemNotFound(f"item {item_id} not found")
        if expand:
            return json_answer(
                200,
                ItemDetailOut.model_validate(entry.view(timezone.now(), expand=True)).model_dump(),
            )
        data = entry.view(timezone.now())
        # Validated once per entry (a pydantic pass costs 100 us here): validating a new age or
        # status changes neither, so they are put into the dumped entry as they are.
        known = self._dumped.get(item_id)
        if known is None or known[0] is not entry:
            dumped = ItemDetailOut.model_validate(data).model_dump()
            if len(self._dumped) >= self._max_entries:
                self._dumped.clear()
            self._dumped[item_id] = (entry, dumped)
        elif data["latest"] is None:
            dumped = known[1]
        else:
            judged = {"age_s": data["latest"]["age_s"], "status": data["latest"]["status"]}
            dumped = {**known[1], "latest": {**known[1]["latest"], **judged}}
        return json_answer(200, dumped)

    def invalidate(self) -> None:
        """Forget every entry (a write went through this process)."""
        self._local_generation += 1
        self._entries.clear()

    def on_event(self, subject: str, envelope: dict[str, Any], payload: str) -> None:
        """An `events` transport: an item event published here invalidates the cache."""
        if str(envelope.get("type", "")).startswith("item."):
            self.invalidate()

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
events.add_transport(item_details.on_event)
