"""An HTTP answer as bytes: what a handler of a hot route returns to both entrances.

The fast entrance (`edge.routes`) sends it as it is; a ninja route returns `to_response(answer)`,
so the two give the same status, headers and bytes. Bodies are rendered the way ninja renders a
view's result: validated against the route's response schema, dumped, and encoded with the API's
encoder (`config.jsonenc`, exact decimals).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from pydantic import BaseModel

from config.jsonenc import dumps

# ASGI's shapes (https://asgi.readthedocs.io/en/latest/specs/www.html).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class DownstreamApp(Protocol):
    """The app the edge hands requests on to: Django's ASGIHandler, or a test's app.

    Scope and send are Any because two typings of the same dicts disagree: django-stubs has
    the handler take a `dict` scope and call `send` with a `Mapping`, while servers and httpx's
    ASGITransport (as `Scope` and `Send` above) give a `MutableMapping` scope and a `send` for
    `MutableMapping`s; whatever the edge receives it passes on as is.
    """

    def __call__(self, scope: Any, receive: Receive, send: Any) -> Awaitable[None]: ...


JSON = "application/json; charset=utf-8"
Headers = tuple[tuple[str, str], ...]
_JSON_HEADERS: Headers = (("Content-Type", JSON),)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: Headers = _JSON_HEADERS


def json_answer(status: int, data: Any, headers: Headers = ()) -> Answer:
    return Answer(status, dumps(data).encode(), (*_JSON_HEADERS, *headers))


def render(schema: type[BaseModel], data: Any, *, by_alias: bool = False) -> Answer:
    """200 with `data` as the route's response schema shapes it."""
    return json_answer(200, schema.model_validate(data).model_dump(by_alias=by_alias))


def to_response(answer: Answer) -> HttpResponseBase:
    """The answer as a Django response (for the ninja routes)."""
    response = (
        _NotModified() if answer.status == 304 else HttpResponse(answer.body, status=answer.status)
    )
    for name, value in answer.headers:
        response[name] = value
    return response


async def _no_body() -> AsyncIterator[bytes]:
    """An async generator that yields nothing."""
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


class _NotModified(StreamingHttpResponse):
    """A 304 without a body or a Content-Length header.

    CommonMiddleware gives every non-streaming response a length, `0` here, which RFC 9110 8.6
    forbids (a 304 may only repeat the 200's length), and uvicorn refuses a 304 that announces
    the 200's length without its bytes; streaming responses keep none.
    """

    status_code = 304

    def __init__(self) -> None:
        super().__init__(_no_body())
        del self["Content-Type"]
