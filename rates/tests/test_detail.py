"""The item-detail cache behind the fast path: read once, kept only while it stands."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from django.utils import timezone

from items.models import Item
from rates import detail
from rates.detail import ItemDetailCache

# The reads run in another thread, which must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


class Versions:
    """A stand-in for the snapshot: item events and rate versions set by the test."""

    def __init__(self) -> None:
        self.items_generation = 0
        self.versions: dict[str, int] = {}

    def version_of(self, code: str) -> int:
        return self.versions.get(code, 0)


@pytest.fixture
def item() -> Item:
    return Item.objects.create(base="ABC", quote="USD", name="first")


async def test_it_reads_once_and_stands_until_an_item_event_or_a_newer_rate(item: Item) -> None:
    source = Versions()
    cache = ItemDetailCache(source)
    now = timezone.now()
    first = await cache.get(item.pk, now=now)
    assert first is not None
    assert (first["code"], first["latest"]) == ("ABC-USD", None)
    assert await cache.get(item.pk, now=now) == first
    assert cache.reads == 1
    source.versions["ABC-USD"] = 1  # a rate.updated the row read did not have yet
    await cache.get(item.pk, now=now)
    assert cache.reads == 2
    source.items_generation += 1  # item.updated
    await cache.get(item.pk, now=now)
    assert cache.reads == 3
    cache.invalidate()  # a write went through this process
    await cache.get(item.pk, now=now)
    assert cache.reads == 4


async def test_an_entry_expires_after_max_age(item: Item) -> None:
    clock = [100.0]
    cache = ItemDetailCache(Versions(), clock=lambda: clock[0], max_age_s=1.0)
    now = timezone.now()
    first = await cache.get(item.pk, now=now)
    await Item.objects.filter(pk=item.pk).aupdate(name="changed, its event lost")
    clock[0] += 0.5
    assert await cache.get(item.pk, now=now) == first
    clock[0] += 0.6
    changed = await cache.get(item.pk, now=now)
    assert changed is not None
    assert changed["name"] == "changed, its event lost"
    assert cache.reads == 2


async def test_an_unknown_item_is_none(item: Item) -> None:
    assert await ItemDetailCache(Versions()).get(item.pk + 1000, now=timezone.now()) is None


async def test_a_read_an_item_event_overtook_is_answered_but_not_kept(
    item: Item, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Versions()
    cache = ItemDetailCache(source)
    read = detail._read

    def raced(item_id: int) -> Any:
        found = read(item_id)
        source.items_generation += 1  # the event of a write that committed after this read
        return found

    monkeypatch.setattr(detail, "_read", raced)
    assert await cache.get(item.pk, now=timezone.now()) is not None
    monkeypatch.setattr(detail, "_read", read)
    await cache.get(item.pk, now=timezone.now())
    assert cache.reads == 2


async def test_a_request_after_an_invalidation_never_joins_an_older_read(
    item: Item, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ItemDetailCache(Versions())
    started, release = threading.Event(), threading.Event()
    read = detail._read

    def slow_first(item_id: int) -> Any:
        if not started.is_set():
            started.set()
            assert release.wait(10)
            return read(item_id)
        found = read(item_id)
        assert found is not None
        fields, row = found
        return {**fields, "name": "second"}, row  # what the write changed

    monkeypatch.setattr(detail, "_read", slow_first)
    now = timezone.now()
    before = asyncio.create_task(cache.get(item.pk, now=now))
    assert await asyncio.to_thread(started.wait, 10)
    joined = asyncio.create_task(cache.get(item.pk, now=now))  # shares the read in flight
    await asyncio.sleep(0)
    cache.invalidate()  # a write committed meanwhile
    after = asyncio.create_task(cache.get(item.pk, now=now))
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(before, joined, after)
    assert cache.reads == 2
    assert [r["name"] for r in results if r is not None] == ["first", "first", "second"]
