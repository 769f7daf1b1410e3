"""The transactional outbox's rows: written with the change, read by the relay, marked, pruned.

`record()` runs inside the writer's transaction (`realtime.events.publish_on_commit`); the
others run in the NATS connection's worker threads (`realtime.nats.publishing`), each closing
its database connection when done. docs/events.md#no-lost-event describes the guarantees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from django.apps import apps
from django.db import close_old_connections, connections
from django.utils import timezone

if TYPE_CHECKING:
    from realtime.models import OutboxEvent

T = TypeVar("T")

# Delivered rows are kept this long (what was sent recently, for an operator to look at), then
# deleted; undelivered rows are never deleted here.
RETENTION = timedelta(minutes=10)

_recorded = False


def _rows() -> type[OutboxEvent]:
    """The model, looked up when first used: `realtime.nats` (which imports this module) is
    imported by scripts before Django's apps are ready (tests/prod_stack.py, bench/)."""
    model: type[OutboxEvent] = apps.get_model("realtime", "OutboxEvent")
    return model


def record(rows: Iterable[tuple[str, str, str]]) -> None:
    """Write events `(event_id, subject, payload)` in the current transaction, in one insert and
    in their order (the relay's order; called by `publish_on_commit`)."""
    global _recorded
    # Imported here, as `_rows` looks the model up: this module is imported before the apps.
    from realtime.models import OUTBOX_ROWS

    now = timezone.now()
    OUTBOX_ROWS.write(
        {
            "event_id": event_id,
            "subject": subject,
            "payload": payload,
            "created_at": now,
            "delivered_at": None,
        }
        for event_id, subject, payload in rows
    )
    _recorded = True


def forget_recorded() -> None:
    """As if this process had written no row yet (a test starting as a fresh process)."""
    global _recorded
    _recorded = False


def recorded_here() -> bool:
    """Has this process written outbox rows (so that it keeps their books and relays)?"""
    return _recorded


def undelivered(after: int, limit: int, prefix: str) -> list[tuple[int, str, str, str]]:
    """Up to `limit` undelivered rows of subjects under `prefix` after position `after`,
    oldest first: `(position, event_id, subject, payload)`.

    Only the prefix's own: a row written under another KURS_NATS_PREFIX (the setting changed,
    or another deployment shares the database) can never be stored by this prefix's stream, and
    relaying it again and again held every newer event behind its refusal."""
    rows = (
        _rows()
        .objects.filter(delivered_at__isnull=True, id__gt=after, subject__startswith=f"{prefix}.")
        .order_by("id")
        .values_list("id", "event_id", "subject", "payload")[:limit]
    )
    return [(pk, str(event_id), subject, payload) for pk, event_id, subject, payload in rows]


def mark_delivered(event_ids: Iterable[str]) -> int:
    ids = list(event_ids)
    if not ids:
        return 0
    return (
        _rows()
        .objects.filter(event_id__in=ids, delivered_at__isnull=True)
        .update(delivered_at=timezone.now())
    )


def prune() -> int:
    """Delete the rows delivered more than `RETENTION` ago; how many."""
    cutoff = timezone.now() - RETENTION
    deleted, _ = _rows().objects.filter(delivered_at__lt=cutoff).delete()
    return deleted


def in_worker_thread(work: Callable[[], T]) -> T:
    """Run `work` (in a thread of its own, not a request's) and close the thread's database
    connection after it, so that no idle connection is left behind in a pool thread."""
    close_old_connections()
    try:
        return work()
    finally:
        connections.close_all()
