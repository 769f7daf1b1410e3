"""The owner's lease (docs/architecture.md#one-owner-of-live-state): who may write current rates and
run breakers now.

A row in the database (`OwnerLease`), not a Redis key or an advisory lock: every deployment has
the database (Redis is optional), the same code serves SQLite and PostgreSQL, and the current
rates it guards live in the same database. Expiry is judged by the database's clock on
PostgreSQL, so processes on several hosts agree without trusting each other's clocks.

The holder renews every `RENEW_EVERY` seconds; a holder that dies (SIGKILL included) stops
renewing and a standby takes the lease once `TTL` has passed. A holder also stops believing it
holds the lease `TTL - SAFETY` after its last successful renewal began, whatever the database
says, so an owner stalled past its lease never writes beside its successor.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from rates.models import OwnerLease

logger = logging.getLogger(__name__)

LIVE_RATES = "live-rates"
TTL = 6.0
RENEW_EVERY = 1.5
# The holder's own deadline ends this much before the database's, to absorb a slow renewal.
SAFETY = 1.0


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    epoch: int
    expires_at: datetime


def _db_now() -> datetime:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT clock_timestamp()")
            now: datetime = cursor.fetchone()[0]
            return now
    return timezone.now()


@transaction.atomic
def lease_try_acquire(*, holder: str, name: str = LIVE_RATES, ttl: float = TTL) -> int | None:
    """Take or renew the lease for `holder`; its epoch when held, None when another holds it.

    Each step is one conditional UPDATE (or an INSERT against the primary key), so two
    contenders can never both win, on PostgreSQL or SQLite.
    """
    now = _db_now()
    expires = now + timedelta(seconds=ttl)
    mine = OwnerLease.objects.filter(name=name, holder=holder)
    if mine.update(expires_at=expires):
        return mine.values_list("epoch", flat=True).get()
    previous = OwnerLease.objects.filter(name=name).values_list("holder", flat=True).first()
    taken = OwnerLease.objects.filter(name=name, expires_at__lt=now).update(
        holder=holder, epoch=F("epoch") + 1, acquired_at=now, expires_at=expires
    )
    if taken:
        logger.warning("lease %s: taken over from %s, whose lease had expired", name, previous)
        return mine.values_list("epoch", flat=True).get()
    if previous is not None:
        return None
    try:
        with transaction.atomic():
            OwnerLease.objects.create(
                name=name, holder=holder, epoch=1, acquired_at=now, expires_at=expires
            )
    except IntegrityError:  # another process created it first
        return None
    return 1


def lease_release(*, holder: str, name: str = LIVE_RATES) -> bool:
    """Give the lease up at once (a clean shutdown), so a standby need not wait for expiry."""
    return OwnerLease.objects.filter(name=name, holder=holder).delete()[0] > 0


def lease_holder(*, name: str = LIVE_RATES) -> LeaseInfo | None:
    """The current holder, or None when the lease is free or expired."""
    lease = OwnerLease.objects.filter(name=name).first()
    if lease is None or lease.expires_at < _db_now():
        return None
    return LeaseInfo(lease.holder, lease.epoch, lease.expires_at)


def live_names(*, prefix: str, forget: str, after: timedelta = timedelta(minutes=1)) -> list[str]:
    """The names of the leases under `prefix` that are live now (by the database's clock);
    those under `forget` expired longer than `after` ago are deleted on the way."""
    now = _db_now()
    OwnerLease.objects.filter(name__startswith=forget, expires_at__lt=now - after).delete()
    rows = OwnerLease.objects.filter(name__startswith=prefix, expires_at__gte=now)
    return list(rows.values_list("name", flat=True))


class Lease:
    """This process's hold on the lease: `held()` is the cheap check before every write."""

    def __init__(self, *, holder: str | None = None, name: str = LIVE_RATES) -> None:
        # The instance name alone is not unique: forked django-q2 workers inherit their parent's.
        self.holder = holder or f"{settings.KURS_INSTANCE}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.name = name
        self.epoch: int | None = None
        self._valid_until = 0.0  # time.monotonic()

    def held(self) -> bool:
        return self.epoch is not None and time.monotonic() < self._valid_until

    def try_acquire(self) -> bool:
        """Take or renew (sync: call through sync_to_async from a loop). False: not ours."""
        started = time.monotonic()
        try:
            epoch = lease_try_acquire(holder=self.holder, name=self.name)
        except DatabaseError as exc:
            # Keep what we had until our own deadline; the next renewal may get through, on a
            # new connection (a terminated one would otherwise fail every renewal after it).
            logger.warning("lease %s: cannot renew: %s", self.name, exc)
            close_old_connections()
            return self.held()
        if epoch is None:
            self.epoch = None
            return False
        if self.epoch != epoch:
            logger.info("lease %s: held by %s (epoch %d)", self.name, self.holder, epoch)
        self.epoch = epoch
        self._valid_until = started + TTL - SAFETY
        return True

    def release(self) -> None:
        if self.epoch is None:
            return
        self.epoch = None
        try:
            lease_release(holder=self.holder, name=self.name)
        except DatabaseError as exc:
            logger.warning("lease %s: cannot release (it expires by itself): %s", self.name, exc)
