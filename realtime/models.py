"""The transactional outbox (docs/events.md#no-lost-event).

An `OutboxEvent` is written in the same transaction as the change it announces, so an event
exists exactly when its change does. It is published right after the commit and marked
delivered once JetStream acknowledged it; what is left undelivered (NATS down, the publisher
killed between its commit and its publish) is published again, in order, by whoever relays
next. Delivered rows are pruned after `realtime.outbox_rows.RETENTION`.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from config.rows import Insert


class OutboxEvent(models.Model):
    id = models.BigAutoField(primary_key=True)  # the relay's order: the order of the writes
    event_id = models.UUIDField(unique=True)  # the envelope's `id`, sent as `Nats-Msg-Id`
    subject = models.CharField(max_length=255)
    payload = models.TextField()  # the envelope as sent, JSON
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        verbose_name = "outbox event"

    def __str__(self) -> str:
        return f"{self.subject} {self.event_id}"


# The writers' outbox rows (`realtime.outbox_rows.record`): every column, no model instance each.
OUTBOX_ROWS = Insert(OutboxEvent, ("event_id", "subject", "payload", "created_at", "delivered_at"))
