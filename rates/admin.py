"""The admin's view of rates: each item's current rate in the item list, and a read-only history.

The item list's rate columns live here rather than in `items/admin.py`: the items app never
imports rates (its data layer stays below rates), and whether a rate is stale now is the rates
app's rule (`rates.policy.read_status`). This module extends the items admin and registers it
again for the same model.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from items.admin import ItemAdmin
from items.models import Item
from rates.models import CurrentRate, Rate
from rates.policy import read_status
from rates.selectors import COUNT_CAP

if TYPE_CHECKING:
    RatePaginatorBase = Paginator[Rate]
    RateAdminBase = admin.ModelAdmin[Rate]
else:  # neither is subscriptable at run time
    RatePaginatorBase = Paginator
    RateAdminBase = admin.ModelAdmin


def current_of(item: Item) -> CurrentRate | None:
    """The item's current rate (loaded with the list), or None before its first quote."""
    try:
        return item.current_rate
    except CurrentRate.DoesNotExist:
        return None


def grouped(value: Decimal) -> str:
    """Every stored digit, none of the padding, grouped for reading (91,234.500000012)."""
    return format(value.normalize(), ",f")


def history_url(item: Item) -> str:
    return f"{reverse('admin:rates_rate_changelist')}?item__id__exact={item.pk}"


admin.site.unregister(Item)


@admin.register(Item)
class RatedItemAdmin(ItemAdmin):
    """The items admin with what an operator checks first: who serves each pair, at what rate,
    whether it is stale, and where its history is."""

    list_display = ("code", "name", "is_active", "rate", "provider", "status", "history")
    list_select_related = ("current_rate",)

    @admin.display(description="rate")
    def rate(self, item: Item) -> str:
        current = current_of(item)
        return grouped(current.value) if current else "—"

    @admin.display(description="provider")
    def provider(self, item: Item) -> str:
        current = current_of(item)
        return current.provider if current else "—"

    @admin.display(description="status")
    def status(self, item: Item) -> str:
        current = current_of(item)
        if current is None:
            return "no rate yet"
        return read_status(current.status, current.provider, current.checked_at, now=timezone.now())

    @admin.display(description="history")
    def history(self, item: Item) -> str:
        return format_html('<a href="{}">rates</a>', history_url(item))


class CappedCountPaginator(RatePaginatorBase):
    """A history holds millions of rows: counting them all would take seconds per page, so the
    count stops at the API's cap (the last page link then shows the first COUNT_CAP rates)."""

    @cached_property
    def count(self) -> int:
        rates: QuerySet[Rate] = self.object_list  # type: ignore[assignment]  # the admin pages a QuerySet
        return rates[:COUNT_CAP].count()


@admin.register(Rate)
class RateAdmin(RateAdminBase):
    """Every stored rate, read-only: history is what the providers said, never edited."""

    list_display = ("received_at", "item", "provider", "rate", "bid", "ask", "source_time")
    list_filter = ("item", "provider", "derived")
    list_select_related = ("item",)
    list_per_page = 100
    paginator = CappedCountPaginator
    show_full_result_count = False
    ordering = ("-received_at", "-id")

    @admin.display(description="value", ordering="value")
    def rate(self, rate: Rate) -> str:
        return grouped(rate.value)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Rate | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Rate | None = None) -> bool:
        return False
