"""`GET /api/v1/rates/{base}/{quote}`, `GET|POST /api/v1/convert` and, at an instant,
`GET /api/v1/items/{id}/rates/latest`: their one handler each.

Both entrances call these with input already validated by the routes' own schemas (`PairPath`,
`ConvertQuery`, `ConvertIn`): the ninja routes (`rates.api`) through ninja, the edge's route
table (`edge.routes`) through the same models. They read through `rates.ondemand` (tracked pairs
from the snapshot, others on demand) and render the bytes both entrances send; PairNotPriced and
ProvidersUnavailable and OnDemandBudgetExceeded leave as `edge.errors` maps them (404, 503, 429).

With `at` (docs/api.md#point-in-time) they answer from the served log (`rates.servedlog`): the
version served at that instant, with a strong ETag and, for a GET, `edge.caching.point_in_time`'s
`Cache-Control`. The edge's route table leaves every `at` request to the ninja routes.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from config.jsonenc import dumps
from edge.answer import JSON, Answer, render
from edge.caching import point_in_time
from items.selectors import item_get
from rates import ondemand, servedlog
from rates.courses import etag_matches
from rates.providers import Pair
from rates.schemas import (
    ConvertAtOut,
    ConvertIn,
    ConvertOut,
    CurrentRateAtOut,
    PairPath,
    PairRateAtOut,
    PairRateOut,
    PointInTimeQuery,
)
from rates.selectors import current_rate_view


async def pair_answer(
    pair: PairPath,
    client: str,
    when: PointInTimeQuery | None = None,
    if_none_match: str | None = None,
) -> Answer:
    """`client` (edge.clients) pays for a pair priced anew (rates.ondemand's budgets)."""
    asked = Pair(pair.base, pair.quote)
    expand = when is not None and when.expand == "sources"
    if when is not None and when.at is not None:
        priced = await ondemand.pair_rate(asked, at=when.at, expand=expand)
        return at_answer(PairRateAtOut, priced, expand=expand, if_none_match=if_none_match)
    priced = await ondemand.pair_rate(asked, client=client or None, expand=expand)
    return render(PairRateOut, priced)


async def convert_answer(
    asked: ConvertIn, client: str, *, if_none_match: str | None = None, get: bool = True
) -> Answer:
    """`get`: asked with GET (a POST's answer is its request's alone: never cached)."""
    expand = asked.expand == "sources"
    result = await ondemand.convert(
        source=asked.from_,
        target=asked.to,
        amount=asked.amount,
        client=client or None,
        side=asked.side,
        at=asked.at,
        expand=expand,
    )
    if asked.at is None:
        return render(ConvertOut, result, by_alias=True)
    return at_answer(
        ConvertAtOut, result, expand=expand, if_none_match=if_none_match, get=get, by_alias=True
    )


async def latest_at_answer(
    item_id: int, when: PointInTimeQuery, if_none_match: str | None = None
) -> Answer:
    """`latest` at the instant `when.at`: the item's version served then, judged then."""
    assert when.at is not None
    item = await item_get(item_id=item_id)
    version = await servedlog.aversion_at(when.at, item_id=item.id)
    data = {**current_rate_view(version.row, now=when.at), **version.fields()}
    expand = when.expand == "sources"
    if expand:
        data["sources"] = await servedlog.asources_at(
            item.id, when.at, serving=version.row.provider
        )
    return at_answer(CurrentRateAtOut, data, expand=expand, if_none_match=if_none_match)


def at_answer(
    schema: type[BaseModel],
    data: dict[str, Any],
    *,
    expand: bool,
    if_none_match: str | None,
    get: bool = True,
    by_alias: bool = False,
) -> Answer:
    """An answer about an instant: the body, a strong ETag of its bytes, and for a GET the
    `Cache-Control` of `edge.caching.point_in_time` and 304 when `If-None-Match` has the tag."""
    dumped = schema.model_validate(data).model_dump(by_alias=by_alias)
    if not expand:
        dumped.pop("sources", None)
    body = dumps(dumped).encode()
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers: tuple[tuple[str, str], ...] = (("ETag", etag),)
    if get:
        until: datetime | None = data.get("valid_until")
        # A conversion of an asset into itself (no version) is final too.
        closed = until is not None or data.get("valid_from", True) is None
        headers += (("Cache-Control", point_in_time(closed=closed)),)
        if if_none_match is not None and etag_matches(if_none_match, etag):
            return Answer(304, b"", headers)
    return Answer(200, body, (("Content-Type", JSON), *headers))
