"""The one way every event leaves Kurs: an envelope, a subject, a publish.

`publish()` builds the envelope of docs/events.md and hands it to the process's transport.
Writers use `publish_on_commit()`: the event is written to the outbox in the writer's own
transaction and leaves once the write is durable, never mid-transaction; a rolled-back write
publishes nothing, and a committed one is published even when this process dies before it
could send it (the relay, docs/events.md#no-lost-event).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from config.jsonenc import dumps
from realtime import outbox_rows

logger = logging.getLogger(__name__)

Envelope = dict[str, Any]
# (subject, envelope, payload): `payload` is the envelope as JSON (`dumps`), encoded once per
# event; the outbox row stores these very bytes, and the NATS transport sends them.
Transport = Callable[[str, Envelope, str], None]

# type -> subject suffix below KURS_NATS_PREFIX (docs/events.md)
_SUBJECTS = {
    "item.created": "items.created",
    "item.updated": "items.updated",
    "item.deleted": "items.deleted",
    "fetch.completed": "fetch.completed",
    "provider.state": "provider.state",
    "peg.broken": "peg.broken",
    "peg.restored": "peg.restored",
    "quote.excluded": "quotes.excluded",
}

_transports: list[Transport] = []


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def make_envelope(event_type: str, data: dict[str, Any]) -> Envelope:
    return {"type": event_type, "data": data, "ts": utc_now_iso(), "id": str(uuid.uuid4())}


def subject_for(event_type: str, data: dict[str, Any]) -> str:
    prefix = settings.KURS_NATS_PREFIX
    if event_type == "rate.updated":
        return f"{prefix}.rates.{data['direction']}"
    try:
        return f"{prefix}.{_SUBJECTS[event_type]}"
    except KeyError:
        raise ValueError(f"unknown event type {event_type!r}") from None


def add_transport(transport: Transport) -> None:
    """Register where envelopes go (the NATS bridge, the channel-layer fallback, a test probe)."""
    if transport not in _transports:
        _transports.append(transport)


def remove_transport(transport: Transport) -> None:
    if transport in _transports:
        _transports.remove(transport)


def _subject_or_none(event_type: str, data: dict[str, Any]) -> str | None:
    try:
        return subject_for(event_type, data)
    except (ValueError, KeyError, TypeError):
        # A malformed event is a bug in its producer; the write that produced it still stands.
        logger.exception("event %s not published: no subject for %r", event_type, data)
        return None


def _hand_over(subject: str, envelope: Envelope, payload: str) -> None:
    logger.debug("event %s on %s", envelope["type"], subject, extra={"event_id": envelope["id"]})
    for transport in list(_transports):
        try:
            transport(subject, envelope, payload)
        except Exception:
            # A broken transport must not break the write that produced the event.
            logger.exception("event transport %r failed for %s", transport, subject)


def publish(event_type: str, data: dict[str, Any]) -> Envelope:
    """Build the envelope and hand it to every registered transport; never raises.

    Callable from sync code in any thread and from async code: transports only queue the
    envelope (see `realtime.nats`), so the caller never waits on the network. At most once:
    what announces no database write (`fetch.completed`, `provider.state`) goes this way.
    """
    envelope = make_envelope(event_type, data)
    subject = _subject_or_none(event_type, data)
    if subject is not None:
        _hand_over(subject, envelope, dumps(envelope))
    return envelope


def publish_on_commit(event_type: str, data: dict[str, Any]) -> str | None:
    """Write the event to the outbox in the current transaction, `publish` it once that commits;
    returns the event's id (None for a type without a subject: nothing is written).

    Outside a transaction the row is written at once (autocommit) and the event leaves at once.
    """
    envelope = make_envelope(event_type, data)
    return envelope["id"] if publish_all_on_commit([envelope]) else None


def publish_all_on_commit(envelopes: Sequence[Envelope]) -> int:
    """`publish_on_commit` for envelopes made by `make_envelope` (their ids already named in the
    rows they announce): one insert into the outbox, published in order once the transaction
    commits; returns how many were written (an envelope without a subject is not)."""
    # Each envelope encoded once: the row stores the payload that is sent.
    ready = [
        (subject, envelope, dumps(envelope))
        for envelope in envelopes
        if (subject := _subject_or_none(envelope["type"], envelope["data"])) is not None
    ]
    if not ready:
        return 0
    outbox_rows.record((envelope["id"], subject, payload) for subject, envelope, payload in ready)

    def hand_over() -> None:
        for subject, envelope, payload in ready:
            _hand_over(subject, envelope, payload)

    transaction.on_commit(hand_over)
    return len(ready)
