"""The fast entrance: the hot reads answered from memory, by the handlers the ninja routes call.

Django's async request path tops out near 600-1,000 req/s on two cores: a thread per request for
the ORM's thread-sensitive context, two thread hops in each sync-only middleware, a database
connection opened and closed per request. These routes need none of it, so the edge answers them
itself when Django's own URL patterns resolve the path to one of them (`ROUTES`, by the name
Django gives the route; the path, its converters and the metric label are Django's):

- `GET /api/v1/courses`: `rates.courses` (a body precomputed per snapshot state and filter);
- `GET /api/v1/items/{id}`: `rates.detail.item_details.answer` (the item cache);
- `GET /api/v1/rates/{base}/{quote}`, `GET|POST /api/v1/convert`: `rates.answers`;
- `GET /api/v1/items/{id}/candles`: `rates.candles` (computed in the database).

Each entry parses the request as the route declares it, with the route's own schema, and calls
the route's handler. What it does not parse goes to Django, which answers exactly as documented:
input that fails the schema (Django's 422 in the API's shape), a query with other or repeated
fields than `/convert`'s three or the candles' four (so every `?at=`,
docs/api.md#point-in-time), a query on a pair's rate (`?at=`, `?expand=`), a non-ASCII query, a
POST body that is not one small `application/json` object, `/courses` before the snapshot is
loaded (Django loads it or answers 503), and a handler that fails with an error the exception
table does not list (a database gone under an item read: Django answers as documented).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError

from config.jsonenc import loads
from edge.answer import Answer, Message, Receive, Scope
from edge.errors import answer_for, database_failure
from rates.answers import convert_answer, pair_answer
from rates.candles import candles_answer
from rates.courses import courses_cache
from rates.detail import item_details
from rates.schemas import CandleQuery, ConvertIn, ConvertQuery, PairPath
from rates.snapshot import snapshot

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096  # a POST /convert body: three short fields
JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})
_CONVERT_FIELDS = ["amount", "from", "to"]
_CANDLE_FIELDS = frozenset(CandleQuery.model_fields)


@dataclass(slots=True)
class Call:
    """What a route's parser reads of a request."""

    kwargs: dict[str, Any]  # the URL pattern's, converted by Django's converters
    query: str  # ASCII
    if_none_match: str | None
    body: Any = None  # the parsed JSON body of a route that reads one
    client: str = ""  # who asks (edge.clients), for the routes that charge a client


Handler = Callable[[Call], Awaitable[Answer | Any | None]]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler  # answers, or returns None to leave the request to Django
    reads_body: bool = False  # the handler needs the JSON body (read before it is called)
    charges_client: bool = False  # the handler needs who asks (on-demand pricing's budgets)


async def _courses(call: Call) -> Any:
    if not snapshot.loaded:
        return None
    return courses_cache.answer_query(call.query, call.if_none_match)


async def _item(call: Call) -> Answer | None:
    if call.query:
        return None  # `expand=sources` (or a query ninja ignores): Django's route answers
    return await item_details.answer(call.kwargs["item_id"])


async def _pair(call: Call) -> Answer | None:
    if call.query:
        return None  # `?at=`, `?expand=` (or a query ninja ignores): Django's route answers
    try:
        pair = PairPath.model_validate(call.kwargs)
    except ValidationError:
        return None
    return await pair_answer(pair, call.client)


async def _candles(call: Call) -> Answer | None:
    fields = parse_qsl(call.query, keep_blank_values=True)
    names = {name for name, _ in fields}
    if len(names) != len(fields) or not names <= _CANDLE_FIELDS:
        return None  # ninja refuses other fields and takes the last of repeated ones
    try:
        query = CandleQuery.model_validate(dict(fields))
    except ValidationError:
        return None
    return await candles_answer(call.kwargs["item_id"], query)


async def _convert_query(call: Call) -> Answer | None:
    fields = parse_qsl(call.query, keep_blank_values=True)
    if sorted(name for name, _ in fields) != _CONVERT_FIELDS:
        return None  # ninja ignores other fields and takes the last of repeated ones
    return await _convert(ConvertQuery, dict(fields), call.client)


async def _convert_body(call: Call) -> Answer | None:
    body = call.body
    if not isinstance(body, dict) or sorted(body) != _CONVERT_FIELDS:
        return None
    return await _convert(ConvertIn, body, call.client)


async def _convert(schema: type[ConvertIn], fields: dict[str, Any], client: str) -> Answer | None:
    try:
        asked = schema.model_validate(fields)
    except ValidationError:
        return None
    return await convert_answer(asked, client)


# (Django's name of the route, method) -> its entry; `edge/tests/test_routes.py` checks every
# name against the URL patterns.
ROUTES: dict[tuple[str, str], Route] = {
    ("api-v1:list_courses", "GET"): Route(_courses),
    ("api-v1:get_item", "GET"): Route(_item),
    ("api-v1:list_candles", "GET"): Route(_candles),
    ("api-v1:pair_rate", "GET"): Route(_pair, charges_client=True),
    ("api-v1:convert", "GET"): Route(_convert_query, charges_client=True),
    ("api-v1:convert", "POST"): Route(_convert_body, reads_body=True, charges_client=True),
}


async def answer(route: Route, call: Call, *, retry: bool = True) -> Any:
    """The route's answer (an `Answer` or a `CoursesAnswer`), or None when Django must answer.

    A database connection that ends under the read is tried once more (the handlers' reads
    close an unusable connection, so the second one opens a new one), then answered 503.
    """
    try:
        return await route.handler(call)
    except Exception as exc:
        if retry and database_failure(exc):
            logger.warning("fast entrance: %s; reading again on a new connection", exc)
            return await answer(route, call, retry=False)
        mapped = answer_for(exc)
        if mapped is None:
            logger.warning("fast entrance: %r left to Django", exc, exc_info=True)
        return mapped


async def read_json_body(scope: Scope, receive: Receive) -> tuple[Any, Receive]:
    """A small JSON body, parsed as the API parses bodies (exact decimals), or None; and a
    `receive` that hands Django the same messages again, then the client's own."""
    content_type = None
    for name, value in scope["headers"]:
        if name == b"content-type":  # several are Django's call
            content_type = b"" if content_type is not None else value.lower()
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # the client left: Django hears it
        size += len(message.get("body", b""))
        if size > MAX_BODY_BYTES or not message.get("more_body", False):
            break
    replay = _replaying(messages, receive)
    last = messages[-1]
    if (
        content_type not in JSON_TYPES
        or last["type"] != "http.request"
        or last.get("more_body", False)
        or size > MAX_BODY_BYTES
    ):
        return None, replay
    try:
        return loads(b"".join(m.get("body", b"") for m in messages)), replay
    except (ValueError, RecursionError):
        return None, replay


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    pending = list(reversed(messages))

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
