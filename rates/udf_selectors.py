"""The reads behind the UDF endpoints (docs/api.md#tradingview-udf): a symbol's item, its bars
from the candles of `rates.selectors`, the closest earlier bar, and the search."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.db.models import Q

from items.exceptions import ItemNotFound
from items.models import Item
from rates import selectors, udf
from rates.models import CurrentRate, Rate


async def item_by_symbol(symbol: str) -> Item:
    """The item whose code is `symbol` (already normalised by `udf.parse_symbol`)."""
    item = await Item.objects.filter(code=symbol).afirst()
    if item is None:
        raise ItemNotFound(f"unknown symbol {symbol[:40]!r}")
    return item


async def symbol_info(symbol: str) -> dict[str, Any]:
    item = await item_by_symbol(symbol)
    value: Decimal | None = (
        await CurrentRate.objects.filter(item_id=item.id).values_list("value", flat=True).afirst()
    )
    return udf.symbol_payload(
        code=item.code, name=item.name, base=item.base, quote=item.quote, value=value
    )


def _bars(item: Item, resolution: udf.Resolution, window: udf.Window) -> list[selectors.Candle]:
    since, until = window.since, window.until
    provider = selectors.candle_provider(item=item, since=since, until=until)
    if provider is None:
        return []
    candles = selectors.candle_list(
        item=item, interval=resolution.interval, since=since, until=until, provider=provider
    )
    return candles if resolution.factor == 1 else udf.aggregate(candles, resolution.seconds)


def _next_time(item: Item, before: datetime, step: int) -> int | None:
    # The newest row before the window, by the (item, received_at) index: one row read.
    at = (
        Rate.objects.filter(item=item, received_at__lt=before)
        .order_by("-received_at")
        .values_list("received_at", flat=True)
        .first()
    )
    return None if at is None else udf.bar_start(at, step)


def _history(item: Item, resolution: udf.Resolution, window: udf.Window) -> dict[str, Any]:
    bars = _bars(item, resolution, window)
    if bars:
        return udf.bars_payload(bars)
    return udf.no_data_payload(_next_time(item, window.since, resolution.seconds))


async def history(symbol: str, resolution: udf.Resolution, window: udf.Window) -> dict[str, Any]:
    """The UDF bars of `symbol` in `window`, or no_data with the closest earlier bar's time."""
    item = await item_by_symbol(symbol)
    return await sync_to_async(_history)(item, resolution, window)


async def search(query: str, limit: int) -> list[dict[str, str]]:
    """Active items whose code or name contains `query` (any case), by code."""
    items = Item.objects.filter(is_active=True)
    if query:
        items = items.filter(Q(code__icontains=query) | Q(name__icontains=query))
    return [
        udf.search_hit(code=item.code, name=item.name, base=item.base, quote=item.quote)
        async for item in items.order_by("code")[:limit]
    ]
