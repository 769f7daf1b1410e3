"""TradingView UDF endpoints under /api/v1/udf (docs/api.md#tradingview-udf): thin routes that
parse (`rates.udf`), read (`rates.udf_selectors`) and answer.

Parameters arrive as text and are parsed here rather than by ninja's validation, so that every
error, a malformed number included, has the one shape both readers understand: a 4xx with
Kurs's `detail` (and `errors` naming the field) plus the protocol's `"s": "error"` and `errmsg`.
Unknown parameters (the library sends `currencyCode`, `firstDataRequest`...) are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from ninja import Field, Query, Router, Schema
from pydantic import ConfigDict

from config.jsonenc import loads
from edge.answer import json_answer, to_response
from edge.errors import answer_for
from items.exceptions import ItemNotFound
from rates import udf, udf_selectors
from rates.exceptions import InvalidQuery
from rates.schemas import FieldErrorOut, errors

router = Router(tags=["udf"])


class UdfError(Schema):
    s: str = Field(description='"error"')
    errmsg: str = Field(description="the same text as `detail`, for the UDF adapter")
    detail: str
    errors: list[FieldErrorOut] | None = Field(None, description="422: the field at fault")


class SymbolQuery(Schema):
    model_config = ConfigDict(extra="ignore")
    symbol: str = Field("", description="the pair's code, e.g. BTC-USD (`Kurs:` prefix allowed)")


class SearchQuery(Schema):
    model_config = ConfigDict(extra="ignore")
    query: str = Field("", description="part of a code or name, any case; empty: every pair")
    limit: str = Field("", description=f"1 to {udf.MAX_SEARCH}, default {udf.DEFAULT_SEARCH}")


class HistoryQuery(Schema):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    symbol: str = Field("", description="the pair's code, e.g. BTC-USD")
    resolution: str = Field("", description=", ".join(udf.SUPPORTED_RESOLUTIONS) + " (or D)")
    start: str = Field("", alias="from", description="Unix seconds: bars starting at or after")
    to: str = Field("", description="Unix seconds: bars starting before")
    countback: str = Field(
        "", description="this many bar slots before `to`; `from` is then ignored"
    )


class HistoryOut(Schema):
    s: str = Field(description='"ok" or "no_data"')
    t: list[int] | None = None
    o: list[float] | None = None
    h: list[float] | None = None
    low: list[float] | None = Field(None, alias="l")
    c: list[float] | None = None
    v: list[int] | None = Field(None, description="quotes in the bar (a tick volume)")
    # `nextTime` is the protocol's name (no_data: the closest earlier bar's start).
    nextTime: int | None = None


# The edge throttles before the route: its 429 is the plain `{"detail"}`.
_ERRORS = {404: UdfError, 422: UdfError, **errors(429)}


async def _answer(reading: Awaitable[Any]) -> HttpResponseBase:
    """200 with what `reading` gives, or its error as Kurs and the UDF adapter both read it."""
    try:
        data = await reading
    except (InvalidQuery, ItemNotFound) as exc:
        answer = answer_for(exc)
        assert answer is not None  # both classes are in edge.errors.STATUS
        return to_response(json_answer(answer.status, udf.error_payload(loads(answer.body))))
    return to_response(json_answer(200, data))


@router.get("/config", response={200: dict[str, Any], **errors(429)}, summary="UDF configuration")
async def config(request: HttpRequest) -> HttpResponseBase:
    return to_response(json_answer(200, udf.config_payload()))


@router.get(
    "/time",
    response={**errors(429)},
    summary="UDF server time, Unix seconds",
    openapi_extra={
        "responses": {
            "200": {
                "description": "the server's Unix time in whole seconds, as plain text",
                "content": {"text/plain": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}},
            }
        }
    },
)
async def server_time(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(int(time.time())), content_type="text/plain")


@router.get(
    "/symbols",
    response={200: dict[str, Any], **_ERRORS},
    summary="UDF symbol info of a pair (404 unknown_symbol)",
)
async def symbols(request: HttpRequest, query: Query[SymbolQuery]) -> HttpResponseBase:
    async def read() -> dict[str, Any]:
        return await udf_selectors.symbol_info(udf.parse_symbol(query.symbol))

    return await _answer(read())


@router.get("/search", response={200: list[dict[str, str]], **_ERRORS}, summary="UDF symbol search")
async def search(request: HttpRequest, query: Query[SearchQuery]) -> HttpResponseBase:
    async def read() -> list[dict[str, str]]:
        limit = udf.DEFAULT_SEARCH
        if query.limit:
            limit = udf.parse_int("limit", query.limit, low=1, high=udf.MAX_SEARCH)
        return await udf_selectors.search(udf.parse_search(query.query), limit)

    return await _answer(read())


@router.get(
    "/history",
    response={200: HistoryOut, **_ERRORS},
    summary="UDF bars of a pair from its candles (ok, no_data with nextTime)",
)
async def history(request: HttpRequest, query: Query[HistoryQuery]) -> HttpResponseBase:
    async def read() -> dict[str, Any]:
        symbol = udf.parse_symbol(query.symbol)
        resolution = udf.parse_resolution(query.resolution)
        if not query.to:
            raise InvalidQuery("to", "is required (Unix seconds)")
        end = udf.parse_int("to", query.to, low=0, high=udf.MAX_TIME)
        countback = None
        if query.countback:
            countback = udf.parse_int("countback", query.countback, low=1, high=udf.MAX_COUNTBACK)
        start = None
        if query.start and countback is None:
            start = udf.parse_int("from", query.start, low=0, high=udf.MAX_TIME)
        window = udf.history_window(resolution, start=start, end=end, countback=countback)
        return await udf_selectors.history(symbol, resolution, window)

    return await _answer(read())
