"""`GET /api/v1/items/{id}/candles`: the one handler of both entrances
(docs/api.md#get-apiv1itemsidcandles).

`candles_answer(item_id, query)` takes the query as the route's schema (`CandleQuery`) validated
it, reads the candles and renders the bytes both entrances send: the ninja route
(`rates.api.list_candles`, the documented definition) returns them through `to_response`, the
edge's route table (`edge.routes`) sends them as they are, so the two cannot disagree on a byte.

`candles(item_id, interval, since, until)` is the read alone, for other readers of the history
(a chart feed): the same range rules (`rates.selectors.candle_range`), the same default provider
and the same OHLC (`rates.selectors.candle_list`). ItemNotFound and InvalidQuery leave as the
exception table maps them (404, 422, `edge.errors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection
from pydantic import TypeAdapter

from edge.answer import Answer, json_answer
from items.exceptions import ItemNotFound
from items.models import Item
from rates.schemas import CandleOut, CandleQuery
from rates.selectors import Candle, CandleInterval, candle_list, candle_provider, candle_range

PROVIDER_HEADER = "Kurs-Provider"
_MAX_ID = 2**63 - 1  # BigAutoField: a larger id cannot exist (items.selectors.item_get)
_OUT = TypeAdapter(list[CandleOut])


@dataclass(frozen=True, slots=True)
class CandleSeries:
    """The candles of one provider's rows; `provider` None when no provider has a row."""

    provider: str | None
    candles: list[Candle]


def _read(
    item_id: int,
    interval: CandleInterval,
    since: datetime | None,
    until: datetime | None,
    provider: str | None,
) -> CandleSeries:
    """The whole read in one thread hop (sync): the item, the range, the provider, the rows."""
    try:
        item = Item.objects.filter(pk=item_id).first()
        if item is None:
            raise ItemNotFound(f"item {item_id} not found")
        start, end = candle_range(interval=interval, since=since, until=until)
        if provider is None:
            provider = candle_provider(item=item, since=start, until=end)
            if provider is None:
                return CandleSeries(None, [])
        rows = candle_list(item=item, interval=interval, since=start, until=end, provider=provider)
        return CandleSeries(provider, rows)
    finally:
        # Outside a request nothing else closes this thread's connection (CONN_MAX_AGE applies);
        # a connection inside a transaction (a caller's, a test's) is its owner's to close.
        if not connection.in_atomic_block:
            close_old_connections()


async def candle_series(
    item_id: int,
    interval: CandleInterval = CandleInterval.M1,
    since: datetime | None = None,
    until: datetime | None = None,
    provider: str | None = None,
) -> CandleSeries:
    """The item's candles in [since, until) (defaults: docs/api.md#get-apiv1itemsidcandles) of
    `provider`, by default the highest-priority provider with rows in the range.

    ItemNotFound when there is no such item; InvalidQuery when the range is empty or too long.
    """
    if not 0 < item_id <= _MAX_ID:
        raise ItemNotFound(f"item {item_id} not found")
    # Cross rates are named `binance+cbr`; an unencoded `+` in a query string arrives as a space.
    name = provider.replace(" ", "+") if provider else None
    return await sync_to_async(_read)(item_id, interval, since, until, name)


async def candles(
    item_id: int,
    interval: CandleInterval = CandleInterval.M1,
    since: datetime | None = None,
    until: datetime | None = None,
    provider: str | None = None,
) -> list[Candle]:
    """`candle_series`' candles alone, oldest first."""
    return (await candle_series(item_id, interval, since, until, provider)).candles


def render(series: CandleSeries) -> Answer:
    """200 with the candles as `CandleOut` shapes them, and whose rows in `Kurs-Provider`."""
    data = _OUT.dump_python(_OUT.validate_python(series.candles, from_attributes=True))
    headers = () if series.provider is None else ((PROVIDER_HEADER, series.provider),)
    return json_answer(200, data, headers)


async def candles_answer(item_id: int, query: CandleQuery) -> Answer:
    series = await candle_series(item_id, query.interval, query.since, query.until, query.provider)
    return render(series)
