"""The served log and point-in-time reads (docs/api.md#point-in-time).

Every version of a pair's current rate is a `ServedRate` row, written by `record` inside the
transaction that writes the `CurrentRate` row (`rates.services.Writes`), so the log
holds exactly what clients were served. A version is served from its `served_at` until the next
version of the same item (`valid_until`, null while it is current).

`version_at(item, at)` answers "what was served at `at`": the item's last version served at or
before that instant, judged at that instant by the one freshness rule (`rates.policy`): a
version is carried forward at most its provider's freshness window since its last confirmation
(`checked_at`; the Bank of Russia's window is a day), after which it reads `stale`, exactly as a
reader at that instant saw it. The instant is checked first (`check_instant`): one in the future,
or older than the retention (KURS_HISTORY_DAYS), is refused (422); an item with no version at or
before it has nothing to show (404, `NotServedAt`).

`seq`: the JetStream stream sequence of the `rate.updated` event that announced a version, found
by the event's id. The publisher hands each ack to `seq_recorder.ack(event_id, seq)`, which
writes them in batches off its loop (`record_seqs`); until then, and wherever JetStream is
unavailable, it stays null.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections
from django.db.models import Max, OuterRef, Subquery
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from items.models import Item
from rates import policy
from rates.exceptions import InvalidQuery, NotServedAt
from rates.models import CURRENT_ROWS, SERVED_FIELDS, SERVED_ROWS, Rate, ServedRate
from rates.snapshot import course_from_row
from realtime import nats

logger = logging.getLogger(__name__)


# --- Writes ------------------------------------------------------------------------------------
def record(
    item_id: int,
    fields: Mapping[str, Any],
    *,
    event_id: str | None = None,
    served_at: datetime | None = None,
) -> None:
    """Log one version of an item's current rate: `fields` as written to its CurrentRate row.

    Called inside the transaction that writes that row (sync); a failure rolls both back. A
    column absent from `fields` takes its default.
    """
    defaults = {f.attname: f.get_default() for f in ServedRate._meta.concrete_fields}
    row = {name: defaults[name] for name in SERVED_FIELDS} | dict(fields) | {"item_id": item_id}
    values = CURRENT_ROWS.prepare(row, connections[DEFAULT_DB_ALIAS])
    record_all([(values, event_id, served_at or timezone.now())])


def record_all(versions: Iterable[tuple[tuple[Any, ...], str | None, datetime]]) -> None:
    """`record` for versions `(values, event_id, served_at)`, in one insert (a burst of writes,
    `rates.services`): `values` is the version's CurrentRate row as prepared for its upsert
    (`CURRENT_ROWS.prepare`), which the log copies; `seq` comes with the event's ack
    (`record_seqs`)."""
    connection = connections[DEFAULT_DB_ALIAS]
    SERVED_ROWS.write_prepared(
        [
            SERVED_ROWS.prepare(
                {"served_at": served_at, "event_id": event_id, "seq": None},
                connection,
                leading=values,
            )
            for values, event_id, served_at in versions
        ]
    )


def record_seq(event_id: str, seq: int) -> int:
    """The stream sequence of the event `event_id`, on the publisher's JetStream ack; returns
    how many versions it named (0 for another event type, or a version already pruned)."""
    return ServedRate.objects.filter(event_id=event_id, seq__isnull=True).update(seq=seq)


def record_seqs(acks: Iterable[tuple[str, int]]) -> int:
    """`record_seq` for a batch of acks, in one statement.

    One UPDATE per ack, then one with a CASE of a WHEN per ack (Django's expressions resolved
    again for every ack, a third of a core at 1,000 pairs), kept the recorder's thread busy
    (docs/scaling.md#the-owner): the acks go as one subquery joined to the rows instead. An
    event acked twice in the batch (relayed) keeps its first sequence, as across batches."""
    seqs: dict[str, int] = {}
    for acked, number in acks:
        seqs.setdefault(acked, number)
    if not seqs:
        return 0
    quote = connection.ops.quote_name
    table = quote(ServedRate._meta.db_table)
    event_column, seq_column = quote("event_id"), quote("seq")
    # The first row's casts type the columns (the others follow them), so the statement also
    # stands where parameters are bound on the server. UPDATE ... FROM: PostgreSQL, and SQLite
    # since 3.33 (rates.tests.test_servedlog runs it on the SQLite this Python has). A plain
    # subquery, not a WITH ... VALUES: sqlite3 counts rows only for statements that begin with
    # UPDATE.
    rows = " UNION ALL ".join(
        ["SELECT CAST(%s AS varchar(64)) AS event_id, CAST(%s AS bigint) AS seq"]
        + ["SELECT %s, %s"] * (len(seqs) - 1)
    )
    sql = (
        f"UPDATE {table} SET {seq_column} = acked.seq FROM ({rows}) AS acked "
        f"WHERE {table}.{event_column} = acked.event_id AND {table}.{seq_column} IS NULL"
    )
    params = [value for pair in seqs.items() for value in pair]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


class SeqRecorder:
    """JetStream acks to the served log, off the publisher's loop: `ack(event_id, seq)` only
    queues (callable from any thread, never blocks); one daemon thread writes what has queued up
    with `record_seqs`, a batch per transaction. An ack whose write fails is logged and dropped:
    `seq` is then null for that version, as without JetStream."""

    def __init__(self, *, batch: int = 500) -> None:
        self._batch = batch
        self._queue: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._thread: threading.Thread | None = None

    def ack(self, event_id: str, seq: int) -> None:
        with self._lock:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="served-seq", daemon=True)
                self._thread.start()
        self._queue.put((event_id, seq))

    def wait_idle(self, timeout: float) -> bool:
        """Whether every queued ack was written (or dropped) within `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # The acks of the next moment join it: one statement (and one connection, closed
            # after it) for a tenth of a second's acks, not one per ack.
            until = time.monotonic() + ACK_LINGER
            while len(batch) < self._batch and (left := until - time.monotonic()) > 0:
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            failed = False
            try:
                record_seqs(batch)
            except DatabaseError as exc:
                failed = True
                logger.warning("served log: %d acks not recorded: %s", len(batch), exc)
            except Exception:
                # Not the database's answer (a bug, or no database access in this process):
                # the thread must outlive it, or every later ack would wait for nobody.
                failed = True
                logger.exception("served log: %d acks not recorded", len(batch))
            finally:
                # The thread's connection is kept while acks keep coming (a new connection per
                # tenth of a second cost the owner as much as the update itself), and closed
                # when the queue runs dry or after an error (the next batch connects anew).
                if failed or self._queue.empty():
                    connection.close()
                with self._idle:
                    self._pending -= len(batch)
                    self._idle.notify_all()


# How long the recorder gathers acks before writing them (a version's `seq` is bookkeeping:
# null until written, like wherever JetStream is unavailable).
ACK_LINGER = 0.1
# The process's recorder: the publisher's ack callback (docs/api.md#point-in-time).
seq_recorder = SeqRecorder()


def follow_acks() -> None:
    """From now on, each JetStream ack of an event this process sent gives its version its
    `seq` (an owner's start; registering again changes nothing)."""
    nats.on_acked(seq_recorder.ack)


def prune(cutoff: datetime) -> int:
    """Delete versions no longer needed to answer an instant at or after `cutoff`: each item's
    versions served before it, except its last one (which was still served at the cutoff)."""
    last_before = (
        ServedRate.objects.filter(item_id=OuterRef("item_id"), served_at__lte=cutoff)
        .values("item_id")
        .annotate(last=Max("served_at"))
        .values("last")
    )
    # Only rows older than the item's last version at the cutoff (so older than the cutoff).
    deleted, _ = (
        ServedRate.objects.filter(served_at__lt=cutoff)
        .filter(served_at__lt=Subquery(last_before))
        .delete()
    )
    return deleted


# --- Point-in-time reads -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServedVersion:
    """The version of an item's current rate served at `at`, and until when it was served."""

    row: ServedRate
    at: datetime
    valid_until: datetime | None  # the next version's served_at; None while it is current

    @property
    def closed(self) -> bool:
        """A later version exists: every answer about this instant is final (immutable)."""
        return self.valid_until is not None

    def course(self, code: str) -> dict[str, Any]:
        """The version as a snapshot course of `code`, judged at `at`, with the point-in-time
        fields (docs/api.md#point-in-time)."""
        return {**course_from_row(code, self.row).to_dict(self.at), **self.fields()}

    def fields(self) -> dict[str, Any]:
        """What an answer about an instant adds: when the version was served, and its event."""
        return {
            "valid_from": self.row.served_at,
            "valid_until": self.valid_until,
            "version": self.row.version,
            "seq": self.row.seq,
        }


def retention_start(now: datetime) -> datetime:
    """The oldest instant the served log answers for (KURS_HISTORY_DAYS before `now`)."""
    return now - timedelta(days=settings.KURS_HISTORY_DAYS)


def check_instant(at: datetime, *, now: datetime) -> None:
    """InvalidQuery (422) for an instant in the future or beyond the retention."""
    if at > now:
        raise InvalidQuery("at", "is in the future: the served log answers for past instants")
    if at < retention_start(now):
        days = settings.KURS_HISTORY_DAYS
        raise InvalidQuery(
            "at", f"is beyond the retention: versions are kept {days} days (KURS_HISTORY_DAYS)"
        )


# The lookup as SQL: the ORM's Subquery annotation costs 4-6 times the query itself in Python
# (docs/benchmarks.md#point-in-time-lookups); the same SQL runs on PostgreSQL and SQLite.
_VERSION_AT_SQL = """
SELECT s.*, (SELECT n.served_at FROM {log} n
             WHERE n.item_id = s.item_id AND n.served_at > s.served_at
             ORDER BY n.served_at LIMIT 1) AS following
FROM {log} s WHERE s.item_id = {item} AND s.served_at <= %s
ORDER BY s.served_at DESC, s.id DESC LIMIT 1
"""


def version_at(
    at: datetime, *, item_id: int | None = None, code: str | None = None, now: datetime
) -> ServedVersion:
    """The version of the item (by id or code) served at `at`; InvalidQuery or NotServedAt.

    One query, two index reads (`served_item_at`): the last version at or before `at`, and the
    served_at of the next one.
    """
    check_instant(at, now=now)
    key: int | str | None = item_id
    item = "%s"
    if item_id is None:
        item, key = f"(SELECT id FROM {Item._meta.db_table} WHERE code = %s)", code
    sql = _VERSION_AT_SQL.format(log=ServedRate._meta.db_table, item=item)
    instant = connection.ops.adapt_datetimefield_value(at)
    found = list(ServedRate.objects.raw(sql, [key, instant]))
    if not found:
        raise NotServedAt(
            f"{code or f'item {item_id}'} has no rate served at or before {at.isoformat()}"
        )
    row = found[0]
    # `following` is the SQL's own column, not a field: the backend's type, unconverted.
    return ServedVersion(row=row, at=at, valid_until=_db_datetime(vars(row)["following"]))


def _db_datetime(value: Any) -> datetime | None:
    """A datetime read outside a model field: SQLite gives it naive (or as text), in UTC."""
    if value is None:
        return None
    parsed = value if isinstance(value, datetime) else parse_datetime(str(value))
    if parsed is None:
        raise ValueError(f"not a datetime: {value!r}")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


async def aversion_at(
    at: datetime, *, item_id: int | None = None, code: str | None = None
) -> ServedVersion:
    return await sync_to_async(version_at)(at, item_id=item_id, code=code, now=timezone.now())


def sources_at(item_id: int, at: datetime, *, serving: str) -> list[dict[str, Any]]:
    """Each provider's last quote for the item at or before `at` (from the history), judged at
    `at`: `excluded` with reason `stale` once its freshness window had passed.

    The providers are the configured ones and the version's `serving` provider (a cross rate
    `a+b` is history only while it serves); one history read each, newest first.
    """
    names = dict.fromkeys([*settings.KURS_PROVIDERS, serving])
    start = retention_start(timezone.now())
    found = []
    for name in names:
        rate = (
            Rate.objects.filter(
                item_id=item_id, provider=name, received_at__lte=at, received_at__gte=start
            )
            .order_by("-received_at", "-id")
            .first()
        )
        if rate is None:
            continue
        stale = policy.is_stale(name, rate.received_at + policy.STORE_EVERY, now=at)
        found.append(
            {
                "provider": name,
                "value": rate.value,
                "bid": rate.bid,
                "ask": rate.ask,
                "source_time": rate.source_time,
                "age_s": round(max(0.0, (at - rate.received_at).total_seconds()), 3),
                "excluded": stale,
                "reason": policy.STALE if stale else None,
            }
        )
    return found


async def asources_at(item_id: int, at: datetime, *, serving: str) -> list[dict[str, Any]]:
    return await sync_to_async(sources_at)(item_id, at, serving=serving)
