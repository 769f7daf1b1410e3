from __future__ import annotations

from django.db import models

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
