from __future__ import annotations

from django.db import models

from config.rows import Insert
from items.models import Item
from rates.fields import ExactDecimalField


class Rate(models.Model):
    """One accepted quote for an item from one provider; the history of a pair."""

    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="rates")
    provider = models.CharField(max_length=32)
    # Exact decimals: 20 significant integer digits and 18 fractional digits cover
    # both BTC-RUB (~10^7) and tiny altcoin prices without rounding.
    value = ExactDecimalField(max_digits=38, decimal_places=18)
    bid = ExactDecimalField(max_digits=38, decimal_places=18, null=True, blank=True)
    ask = ExactDecimalField(max_digits=38, decimal_places=18, null=True, blank=True)
    source_time = models.DateTimeField()
    received_at = models.DateTimeField()
    derived = models.BooleanField(default=False)
    # How the value was priced: one provider's quote (`priority`) or the median of `n_sources`
    # agreeing sources (`consensus`, provider `consensus`; docs/rates.md#consensus-pricing).
    mode = models.CharField(max_length=16, default="priority")
    n_sources = models.PositiveSmallIntegerField(default=1)
    dispersion_bps = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)

    class Meta:
        ordering = ["-received_at", "-id"]
        indexes = [
            models.Index(fields=["item", "-received_at"], name="rate_item_recent"),
            models.Index(
                fields=["item", "provider", "-received_at"], name="rate_item_provider_recent"
            ),
            models.Index(fields=["received_at"], name="rate_received"),
        ]

    def __str__(self) -> str:
        return f"{self.item_id} {self.provider} {self.value}"


# The owner's history rows (`rates.services`): every column, without a model instance each.
RATE_ROWS = Insert(
    Rate,
    (
        "item_id",
        "provider",
        "value",
        "bid",
        "ask",
        "source_time",
        "received_at",
        "derived",
        "mode",
        "n_sources",
        "dispersion_bps",
    ),
)

# The columns of a current rate besides `route` (stored as JSON text): one list for every copy.
CURRENT_FIELDS = (
    "provider",
    "value",
    "bid",
    "ask",
    "source_time",
    "checked_at",
    "received_at",
    "derived",
    "status",
    "version",
    "mode",
    "n_sources",
    "dispersion_bps",
)


class ServedValue(models.Model):
    """A pair's rate as Kurs serves it, with its evidence: the columns the read model
    (`CurrentRate`) and the served log (`ServedRate`) share, so a version is logged with exactly
    what the read model held."""

    provider = models.CharField(max_length=65)
    value = ExactDecimalField(max_digits=38, decimal_places=18)
    bid = ExactDecimalField(max_digits=38, decimal_places=18, null=True, blank=True)
    ask = ExactDecimalField(max_digits=38, decimal_places=18, null=True, blank=True)
    source_time = models.DateTimeField()
    # The last time a source confirmed this value (a quote, a tick or a poll, changed or not).
    checked_at = models.DateTimeField()
    # When the owner first received this value from this provider.
    received_at = models.DateTimeField()
    derived = models.BooleanField(default=False)
    route = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16)
    # The evidence (docs/rates.md#consensus-pricing): how the value was priced, how many sources
    # it rests on, how far they disagree, and each source considered (JSON, as `route`).
    mode = models.CharField(max_length=16, default="priority")
    n_sources = models.PositiveSmallIntegerField(default=1)
    dispersion_bps = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    sources = models.JSONField(default=list, blank=True)

    class Meta:
        abstract = True


class CurrentRate(ServedValue):
    """The read model (docs/api.md#json-shapes): the rate Kurs stands behind now, one row per item.

    Written only by the live owner (`rates.services`), in the same transaction as any history
    row of the same quote; every reader (REST `latest`, the web snapshot, health) reads it, so
    all surfaces agree on who serves a pair. `status` is the status when written; readers apply
    `rates.policy.read_status` to `checked_at` to see `stale`.
    """

    item = models.OneToOneField(
        Item, on_delete=models.CASCADE, primary_key=True, related_name="current_rate"
    )
    # +1 on every published change of the pair: readers apply events in this order.
    version = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.item_id} {self.provider} {self.value} v{self.version}"


# The columns of a current rate (and of the version it logs): CURRENT_FIELDS and the JSON ones.
SERVED_FIELDS = (*CURRENT_FIELDS, "route", "sources")
# The owner's upsert of its pairs' current rates: every column rewritten but the key.
CURRENT_ROWS = Insert(CurrentRate, ("item_id", *SERVED_FIELDS), conflict="item_id")


class OwnerLease(models.Model):
    """Who owns live state (docs/architecture.md#one-owner-of-live-state): one row per lease name,
    held until `expires_at`.

    A holder renews it well before it expires; a holder that dies (even SIGKILL) simply stops
    renewing, and a standby takes it once it has expired. Times are the database's clock, so
    processes on several hosts agree on expiry without trusting each other's clocks.
    """

    name = models.CharField(max_length=32, primary_key=True)
    holder = models.CharField(max_length=200)
    # Bumped on every change of holder: a fencing token for logs and the status page.
    epoch = models.PositiveBigIntegerField(default=0)
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder} until {self.expires_at}"


class ServedRate(ServedValue):
    """The served log (docs/api.md#point-in-time): every version of a pair's current rate, as
    clients received it, from `served_at` until the next version of the same item.

    Written by `rates.servedlog.record` in the transaction that writes the `CurrentRate` row, so
    the log never disagrees with what was served; pruned with the history
    (`rates.services.prune_history`). `event_id` is the id of the `rate.updated` event that
    announced the version and `seq` its JetStream stream sequence, recorded on the publisher's
    ack (`rates.servedlog.record_seq`); both stay null where they are not known.
    """

    # No index of its own: `served_item_at` starts with the item (an index less at 10^7 rows).
    item = models.ForeignKey(
        Item, on_delete=models.CASCADE, related_name="served_rates", db_index=False
    )
    served_at = models.DateTimeField()
    # The CurrentRate version this row copies.
    version = models.PositiveBigIntegerField()
    # Null where the announcing event's id is not known when the version is written.
    event_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001 - see above
    seq = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        indexes = [
            # The point-in-time lookup: an item's last version served at or before an instant.
            models.Index(fields=["item", "served_at"], name="served_item_at"),
            # `record_seq`: the publisher's ack names the event; only versions still waiting
            # for their ack are in it, so it stays small.
            models.Index(
                fields=["event_id"],
                name="served_event_unacked",
                condition=models.Q(seq__isnull=True, event_id__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.item_id} v{self.version} {self.provider} {self.value} at {self.served_at}"


# The served log's versions (`rates.servedlog.record_all`): every column; `seq` comes with the ack.
# The leading columns are CURRENT_ROWS', from the same fields (`ServedValue`): a version's values
# are prepared once for its current rate and its served version alike.
SERVED_ROWS = Insert(ServedRate, (*CURRENT_ROWS.columns, "served_at", "event_id", "seq"))
