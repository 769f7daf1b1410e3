"""The owner's lease: one holder at a time, taken over only once it has expired."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import DatabaseError, connection, connections
from django.utils import timezone

from rates import fetch_control, lease, services, shards
from rates.lease import Lease, lease_holder, lease_release, lease_try_acquire
from rates.models import OwnerLease
from rates.tests.support import FakeClock

pytestmark = pytest.mark.django_db(transaction=True)


def expire(name: str = lease.LIVE_RATES) -> None:
    OwnerLease.objects.filter(name=name).update(expires_at=timezone.now() - timedelta(seconds=1))


def test_it_gives_the_lease_to_one_holder_and_renews_it_for_that_holder_only() -> None:
    assert lease_try_acquire(holder="a") == 1
    assert lease_try_acquire(holder="b") is None
    first = OwnerLease.objects.get().expires_at
    assert lease_try_acquire(holder="a") == 1  # a renewal keeps the epoch
    assert OwnerLease.objects.get().expires_at > first
    info = lease_holder()
    assert info is not None
    assert (info.holder, info.epoch) == ("a", 1)


def test_it_is_taken_over_only_once_expired_and_the_epoch_moves() -> None:
    assert lease_try_acquire(holder="a") == 1
    expire()
    assert lease_holder() is None
    assert lease_try_acquire(holder="b") == 2
    assert lease_try_acquire(holder="a") is None
    holder = lease_holder()
    assert holder is not None
    assert holder.holder == "b"


def test_a_released_lease_is_free_at_once() -> None:
    assert lease_try_acquire(holder="a") == 1
    assert lease_release(holder="b") is False  # not b's to give
    assert lease_release(holder="a") is True
    assert lease_try_acquire(holder="b") == 1


def test_the_holder_stops_believing_in_its_lease_after_its_own_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = Lease(holder="a")
    assert mine.try_acquire()
    assert mine.held()
    clock = time.monotonic() + lease.TTL - lease.SAFETY + 0.01
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    assert not mine.held()  # whatever the database says: a successor may have it by now


def test_a_holder_that_cannot_renew_loses_the_lease() -> None:
    mine, other = Lease(holder="a"), Lease(holder="b")
    assert mine.try_acquire()
    expire()
    assert other.try_acquire()
    assert not mine.try_acquire()
    assert not mine.held()
    assert other.held()


def _race(round_number: int, contenders: int = 8) -> int:
    barrier = threading.Barrier(contenders)
    won: list[str] = []

    def contend(holder: str) -> None:
        try:
            barrier.wait()
            if lease_try_acquire(holder=holder, name="race") is not None:
                won.append(holder)
        except DatabaseError:
            pass  # SQLite's "database table is locked": a lost race, never a second winner
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=contend, args=(f"h{round_number}-{n}",)) for n in range(contenders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return len(won)


def test_concurrent_contenders_never_both_win() -> None:
    """Eight threads, each with its own database connection, race for a free lease 20 times."""
    winners_per_round = []
    for round_number in range(20):
        winners_per_round.append(_race(round_number))
        expire("race")
    assert winners_per_round == [1] * 20, connection.vendor


def test_two_leases_of_one_process_are_two_holders() -> None:
    """Forked workers share KURS_INSTANCE: each Lease is still a holder of its own."""
    first, second = Lease(), Lease()
    assert first.holder != second.holder
    assert first.try_acquire()
    assert not second.try_acquire()


async def test_the_safety_nets_cycle_keeps_its_lease_however_long_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`POST /tasks/run` with no owner: the cycle may outlast one lease (a round may take
    MAX_ROUND_SECONDS, a loaded machine longer); its writes at the end are still made.

    The holder's clock is the test's (the lease module's alone; asyncio keeps the real one):
    the cycle outlasts its lease by that clock at once, then waits for a renewal that started
    after it. No real time has to pass, so a thread stalled on a loaded machine cannot fail it."""
    clock = FakeClock()
    monkeypatch.setattr(lease, "time", SimpleNamespace(monotonic=clock))
    monkeypatch.setattr(fetch_control, "RENEW_EVERY", 0.01)
    outlasted = 10 * lease.TTL  # the holder's clock once the cycle's work is done
    renewed_after = threading.Event()
    renew = shards.Shards.renew

    def noting_renew(self: shards.Shards, owned: Iterable[int]) -> bool:
        started = clock()
        held = renew(self, owned)
        if held and started >= outlasted:
            renewed_after.set()
        return held

    monkeypatch.setattr(shards.Shards, "renew", noting_renew)
    writable: list[bool] = []

    async def slow_cycle(provider_names: object) -> None:
        writable.append(services.get_board().writable())
        clock.now = outlasted  # the cycle's own work: ten lease lengths
        assert await asyncio.to_thread(renewed_after.wait, 30)
        writable.append(services.get_board().writable())

    monkeypatch.setattr(fetch_control, "_cycle_here", slow_cycle)
    await fetch_control.fetch_once()
    assert writable == [True, True]
    assert not services.get_board().writable()  # and none after it
