"""Reads of the rate history."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from django.db.models import QuerySet

from items.models import Item
from rates.models import Rate


def rate_list(
    *,
    item: Item,
    since: datetime | None = None,
    until: datetime | None = None,
    day: date | None = None,
    provider: str | None = None,
) -> QuerySet[Rate]:
    """An item's rates, newest first; `day` is a UTC calendar day, `until` is exclusive."""
    rates = Rate.objects.filter(item=item)
    if since is not None:
        rates = rates.filter(received_at__gte=since)
    if until is not None:
        rates = rates.filter(received_at__lt=until)
    if day is not None:
        start = datetime.combine(day, time.min, tzinfo=UTC)
        rates = rates.filter(received_at__gte=start, received_at__lt=start + timedelta(days=1))
    if provider:
        rates = rates.filter(provider=provider)
    return rates.order_by("-received_at", "-id")
