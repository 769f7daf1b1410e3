"""Rates endpoints: history of an item, its latest rate, providers, and a fetch cycle on demand."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse
from ninja import Query, Router
from ninja.errors import HttpError

from config.security import read_throttle, write_auth
from items.schemas import RateOut
from items.selectors import item_get, item_latest_rate
from rates import fetcher, selectors
from rates.courses import courses_cache
from rates.models import Rate
from rates.schemas import (
    CoursesOut,
    CoursesQueryIn,
    ProviderOut,
    RateListOut,
    RateListQuery,
    TaskRunOut,
    ValidationErrorOut,
)
from rates.snapshot import snapshot

router = Router(tags=["rates"])


@router.get(
    "/courses",
    response={200: CoursesOut, 304: None, 422: ValidationErrorOut},
    throttle=read_throttle,
    summary="The current course of each pair (the seed format), with ETag",
)
async def list_courses(request: HttpRequest, filters: Query[CoursesQueryIn]) -> HttpResponse:
    """From the in-process snapshot; `config/fastpath.py` serves the same bytes before Django.

    A stale course keeps its last value and says `"stale": true`; a pair never quoted is left
    out. `If-None-Match` with the current ETag answers 304 with no body.
    """
    if not snapshot.loaded:
        await snapshot.aload()
    answer = courses_cache.answer(
        filters.direction, filters.exchanger, request.headers.get("If-None-Match")
    )
    response = HttpResponse(answer.body, status=answer.status)
    if answer.status == 304:
        del response["Content-Type"]
    for name, value in answer.headers:
        response[name] = value
    return response


@router.get("/items/{int:item_id}/rates", response=RateListOut, throttle=read_throttle)
async def list_rates(
    request: HttpRequest, item_id: int, filters: Query[RateListQuery]
) -> dict[str, object]:
    item = await item_get(item_id=item_id)
    # Cross rates are named `binance+cbr`; an unencoded `+` in a query string arrives as a space.
    provider = filters.provider.replace(" ", "+") if filters.provider else None
    rates = selectors.rate_list(
        item=item, since=filters.since, until=filters.until, day=filters.date, provider=provider
    )
    return {"items": [rate async for rate in rates[: filters.limit]], "count": await rates.acount()}


@router.get(
    "/items/{int:item_id}/rates/latest",
    response={200: RateOut},
    throttle=read_throttle,
    summary="The item's latest accepted rate (404 before the first one)",
)
async def latest_rate(request: HttpRequest, item_id: int) -> Rate:
    item = await item_get(item_id=item_id)
    rate = await item_latest_rate(item=item)
    if rate is None:
        raise HttpError(404, f"item {item_id} has no rate yet")
    return rate


@router.get("/providers", response=list[ProviderOut], throttle=read_throttle)
async def list_providers(request: HttpRequest) -> list[dict[str, object]]:
    return await sync_to_async(fetcher.provider_statuses)()


@router.post("/tasks/run", response=TaskRunOut, auth=write_auth)
async def run_task(request: HttpRequest) -> dict[str, object]:
    report = await fetcher.fetch_once()
    return report.event()
