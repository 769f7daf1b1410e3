"""Reads of the rate history and of the current rates (the read model)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from items.models import Item
from rates import policy
from rates.models import CurrentRate, Rate


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


def current_rate_view(row: CurrentRate, *, now: datetime) -> dict[str, Any]:
    """The current rate as REST shows it (SPEC 5 `latest`): status and age judged now."""
    status = policy.read_status(row.status, row.provider, row.checked_at, now=now)
    return {
        "provider": row.provider,
        "value": row.value,
        "bid": row.bid,
        "ask": row.ask,
        "source_time": row.source_time,
        "checked_at": row.checked_at,
        "received_at": row.received_at,
        "age_s": round(max(0.0, (now - row.checked_at).total_seconds()), 3),
        "status": status,
        "derived": row.derived,
        "route": row.route,
        "version": row.version,
    }


async def current_rate_get(*, item_id: int) -> dict[str, Any] | None:
    """The item's current rate (one primary-key read of the read model), or None."""
    row = await CurrentRate.objects.filter(item_id=item_id).afirst()
    return None if row is None else current_rate_view(row, now=timezone.now())


def current_rates_freshness(*, now: datetime) -> dict[str, Any]:
    """For health: how many active pairs have a current rate, and which of them are stale."""
    rows = CurrentRate.objects.filter(item__is_active=True).values_list(
        "item__code", "provider", "checked_at", "status"
    )
    stale = sorted(
        code
        for code, provider, checked_at, status in rows
        if policy.read_status(status, provider, checked_at, now=now) == policy.STALE
    )
    return {
        "active": Item.objects.filter(is_active=True).count(),
        "quoted": len(rows),
        "stale": stale,
    }
