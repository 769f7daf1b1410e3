"""Reads of the rate history."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from django.db.models import QuerySet
from django.utils import timezone

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


# An unchanged quote is stored again only after 60 s (SPEC 4): a provider's newest row can be that
# old and still be its current value. The margin covers one poll period and the write itself.
CURRENT_AFTER_STORE = 75.0
# How many recent rows to look through for each provider's newest one.
RECENT_ROWS = 200


def rate_current(*, item: Item, now: datetime | None = None) -> Rate | None:
    """The rate the service stands behind for `item`: failover applied to the history.

    Every provider's accepted quotes are stored, so "the newest row" alone would flip between
    providers. Instead: the newest row of the highest-priority provider whose newest row is still
    current (within its freshness window, or CURRENT_AFTER_STORE for unchanged values); when no
    provider's is, the newest row of all (the last known value, stale).
    """
    from rates.services import provider_freshness, provider_priority

    now = now or timezone.now()
    newest_by_provider: dict[str, Rate] = {}
    for rate in Rate.objects.filter(item=item).order_by("-received_at", "-id")[:RECENT_ROWS]:
        newest_by_provider.setdefault(rate.provider, rate)
    if not newest_by_provider:
        return None
    current = [
        rate
        for name, rate in newest_by_provider.items()
        if (now - rate.received_at).total_seconds()
        <= max(provider_freshness(name), CURRENT_AFTER_STORE)
    ]
    if not current:
        return max(newest_by_provider.values(), key=lambda rate: (rate.received_at, rate.id))
    return min(current, key=lambda rate: provider_priority(rate.provider))
