"""Rates endpoints: an item's history, latest rate and candles, any pair's rate, conversions,
providers, and a fetch cycle on demand.

The hot reads (`/courses`, candles, a pair, `/convert`) are thin declarations: ninja parses and
validates what they document, then they call the one handler the edge's route table calls too
(`rates.courses`, `rates.candles`, `rates.answers`) and return its bytes. Reads are throttled by
the edge (`edge.security`), before either entrance; `errors(429)` documents it.
"""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.db import DatabaseError
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from ninja import Path, Query, Router
from ninja.errors import HttpError

from edge.answer import Answer, to_response
from edge.clients import client_of_request
from edge.security import tasks_throttle, write_auth
from items.selectors import item_get
from rates import fetch_control as fetcher
from rates import selectors
from rates.answers import convert_answer, latest_at_answer, pair_answer
from rates.candles import candles_answer
from rates.courses import courses_cache
from rates.peg_monitor import peg_statuses
from rates.schemas import (
    CandleOut,
    CandleQuery,
    ConvertAtOut,
    ConvertIn,
    ConvertOut,
    ConvertQuery,
    CoursesOut,
    CoursesQueryIn,
    CurrentRateAtOut,
    CurrentRateOut,
    PairPath,
    PairRateAtOut,
    PairRateOut,
    PegOut,
    PointInTimeQuery,
    ProviderOut,
    RateListOut,
    RateListQuery,
    TaskRunOut,
    errors,
)
from rates.snapshot import snapshot

logger = logging.getLogger(__name__)

router = Router(tags=["rates"])


@router.get(
    "/courses",
    response={200: CoursesOut, 304: None, **errors(422, 429, 503)},
    summary="The current course of each pair (the seed format), with ETag",
)
async def list_courses(request: HttpRequest, filters: Query[CoursesQueryIn]) -> HttpResponseBase:
    """From the in-process snapshot; the edge's route table serves the same bytes before Django.

    A stale course keeps its last value and says `"stale": true`; a pair never quoted is left
    out. `If-None-Match` with the current ETag answers 304 with no body. 503 while the
    snapshot cannot be loaded (the database is unreachable or not migrated yet).
    """
    if not snapshot.loaded:
        try:
            await snapshot.aload()
        except DatabaseError as exc:
            logger.warning("courses: the rates snapshot cannot be loaded: %s", exc)
            raise HttpError(503, "courses are unavailable: the database cannot be read") from None
    answer = courses_cache.answer(
        filters.direction, filters.exchanger, request.headers.get("If-None-Match")
    )
    return to_response(Answer(answer.status, answer.body, answer.headers))


@router.get(
    "/items/{int:item_id}/rates",
    response={200: RateListOut, **errors(404, 422, 429)},
    summary="An item's rate history, newest first",
)
async def list_rates(
    request: HttpRequest, item_id: int, filters: Query[RateListQuery]
) -> dict[str, object]:
    item = await item_get(item_id=item_id)
    # Cross rates are named `binance+cbr`; an unencoded `+` in a query string arrives as a space.
    provider = filters.provider.replace(" ", "+") if filters.provider else None
    rates = selectors.rate_list(
        item=item, since=filters.since, until=filters.until, day=filters.date, provider=provider
    )
    page = [rate async for rate in rates[: filters.limit]]
    return {"items": page, "count": await selectors.rate_count(rates)}


@router.get(
    "/items/{int:item_id}/rates/latest",
    response={200: CurrentRateOut | CurrentRateAtOut, 304: None, **errors(404, 422, 429)},
    summary="The item's current rate: who serves it, its status and age (404 before the first)",
)
async def latest_rate(
    request: HttpRequest, item_id: int, when: Query[PointInTimeQuery]
) -> dict[str, object] | HttpResponseBase:
    """With `at`: the version served at that instant (docs/api.md#point-in-time)."""
    if when.at is not None:
        return to_response(
            await latest_at_answer(item_id, when, request.headers.get("If-None-Match"))
        )
    item = await item_get(item_id=item_id)
    current = await selectors.current_rate_get(
        item_id=item.id, expand=when.expand is not None, markup_bps=item.markup_bps
    )
    if current is None:
        raise HttpError(404, f"item {item_id} has no rate yet")
    return current


@router.get(
    "/items/{int:item_id}/candles",
    response={200: list[CandleOut], **errors(404, 422, 429)},
    summary="OHLC candles of an item's history, one provider's rates (header Kurs-Provider)",
)
async def list_candles(
    request: HttpRequest, item_id: int, filters: Query[CandleQuery]
) -> HttpResponseBase:
    return to_response(await candles_answer(item_id, filters))


@router.get(
    "/rates/{base}/{quote}",
    response={200: PairRateOut | PairRateAtOut, 304: None, **errors(404, 422, 429, 503)},
    summary="The rate of any pair: tracked from the live snapshot, others fetched on demand",
)
async def pair_rate(
    request: HttpRequest, path: Path[PairPath], when: Query[PointInTimeQuery]
) -> HttpResponseBase:
    """With `at`: the version served at that instant (docs/api.md#point-in-time)."""
    answer = await pair_answer(
        path, client_of_request(request), when, request.headers.get("If-None-Match")
    )
    return to_response(answer)


_CONVERT_RESPONSES = {200: ConvertOut | ConvertAtOut, **errors(404, 422, 429, 503)}


@router.get(
    "/convert",
    response={**_CONVERT_RESPONSES, 304: None},
    by_alias=True,
    summary="Convert an amount between two assets, with the rate's provenance",
)
async def convert(request: HttpRequest, params: Query[ConvertQuery]) -> HttpResponseBase:
    if_none_match = request.headers.get("If-None-Match")
    answer = await convert_answer(params, client_of_request(request), if_none_match=if_none_match)
    return to_response(answer)


@router.post(
    "/convert",
    response={**_CONVERT_RESPONSES, **errors(400)},
    by_alias=True,
    summary="Convert, with a JSON body (numbers are read as exact decimals)",
)
async def convert_body(request: HttpRequest, payload: ConvertIn) -> HttpResponseBase:
    return to_response(await convert_answer(payload, client_of_request(request), get=False))


@router.get("/providers", response={200: list[ProviderOut], **errors(429)})
async def list_providers(request: HttpRequest) -> list[dict[str, object]]:
    return await sync_to_async(fetcher.provider_statuses)()


@router.get("/pegs", response={200: list[PegOut], **errors(429)})
async def list_pegs(request: HttpRequest) -> list[dict[str, object]]:
    """Each peg of KURS_PEGS, as the live owner last measured it (docs/api.md#get-apiv1pegs)."""
    return await sync_to_async(peg_statuses)()


@router.post(
    "/tasks/run",
    response={200: TaskRunOut, **errors(401, 429, 503)},
    auth=write_auth,
    throttle=tasks_throttle,
)
async def run_task(request: HttpRequest) -> dict[str, object]:
    """Asks the live owner for a cycle; without an answer in 2 s, runs the safety net
    (docs/api.md#post-apiv1tasksrun).

    503 when a live owner holds the lease but did not answer (NATS unreachable from here): a
    second cycle beside the owner's would break "one owner of live state".
    """
    report = await fetcher.request_cycle()
    if report is not None:
        return report
    cycle = await fetcher.fetch_once()
    if cycle is None:
        raise HttpError(503, "the live fetcher owns rates but did not answer within 2 s")
    return cycle.event()
