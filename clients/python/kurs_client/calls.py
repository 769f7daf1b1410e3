"""Each REST call once: its request and how its answer is read, for both clients.

`Client` and `AsyncClient` only send a `Call` and hand the answer to `Call.answer`, so the
paths, parameters, error mapping and models live here and nowhere else (docs/api.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar
from urllib.parse import quote as escape

from kurs_client import models
from kurs_client.errors import SchemaError, api_error

T = TypeVar("T")
Params = tuple[tuple[str, str], ...]
Amount = Decimal | int | str

PREFIX = "/api/v1"


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[Any], T]
    params: Params | None = None
    body: Any = None
    # Statuses that are answers, not errors (health's 503 is a report: status "down").
    ok: tuple[int, ...] = (200,)
    write: bool = False

    def answer(self, status: int, content: bytes, headers: Mapping[str, str]) -> T:
        try:
            body = models.loads(content) if content else None
        except ValueError:
            body = None
        if status not in self.ok:
            raise api_error(status, body, headers)
        if body is None and content:
            raise SchemaError(f"{self.method} {self.path}: the answer is not JSON")
        return self.read(body)


def _param(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def params(**values: object) -> Params:
    """Query parameters, the None ones left out (absent), lists repeated."""
    result: list[tuple[str, str]] = []
    for key, value in values.items():
        if value is None:
            continue
        name = key.rstrip("_")
        if isinstance(value, list | tuple):
            result.extend((name, _param(entry)) for entry in value)
        else:
            result.append((name, _param(value)))
    return tuple(result)


def _nothing(body: Any) -> None:
    return None


def items(is_active: bool | None, limit: int | None, offset: int | None) -> Call[models.ItemPage]:
    query = params(is_active=is_active, limit=limit, offset=offset)
    return Call("GET", f"{PREFIX}/items", models.ItemPage.from_json, query)


def item(item_id: int) -> Call[models.Item]:
    return Call("GET", f"{PREFIX}/items/{int(item_id)}", models.Item.from_json)


def create_item(
    base: str, quote: str, name: str | None, is_active: bool | None
) -> Call[models.Item]:
    body = {"base": base, "quote": quote, "name": name, "is_active": is_active}
    body = {key: value for key, value in body.items() if value is not None}
    return Call("POST", f"{PREFIX}/items", models.Item.from_json, body=body, ok=(201,), write=True)


def update_item(item_id: int, changes: Mapping[str, Any]) -> Call[models.Item]:
    path = f"{PREFIX}/items/{int(item_id)}"
    return Call("PATCH", path, models.Item.from_json, body=dict(changes), write=True)


def delete_item(item_id: int) -> Call[None]:
    path = f"{PREFIX}/items/{int(item_id)}"
    return Call("DELETE", path, _nothing, ok=(204,), write=True)


def latest(item_id: int, at: datetime | None, expand: str | None) -> Call[models.CurrentRate]:
    path = f"{PREFIX}/items/{int(item_id)}/rates/latest"
    return Call("GET", path, models.CurrentRate.from_json, params(at=at, expand=expand))


def history(
    item_id: int,
    *,
    limit: int | None,
    since: datetime | None,
    until: datetime | None,
    date: str | None,
    provider: str | None,
) -> Call[models.RatePage]:
    query = params(limit=limit, since=since, until=until, date=date, provider=provider)
    path = f"{PREFIX}/items/{int(item_id)}/rates"
    return Call("GET", path, models.RatePage.from_json, query)


def candles(
    item_id: int, interval: str, since: datetime | None, until: datetime | None
) -> Call[list[models.Candle]]:
    path = f"{PREFIX}/items/{int(item_id)}/candles"
    query = params(interval=interval, since=since, until=until)
    return Call("GET", path, models.Candle.many, query)


def rate(base: str, quote: str, at: datetime | None, expand: str | None) -> Call[models.PairRate]:
    path = f"{PREFIX}/rates/{escape(base, safe='')}/{escape(quote, safe='')}"
    return Call("GET", path, models.PairRate.from_json, params(at=at, expand=expand))


def courses(directions: Iterable[str] | None, exchanger: str | None) -> Call[models.Courses]:
    query = params(direction=list(directions) if directions is not None else None)
    query += params(exchanger=exchanger)
    return Call("GET", f"{PREFIX}/courses", models.Courses.from_json, query)


def convert(
    from_: str, to: str, amount: Amount, side: str | None, at: datetime | None
) -> Call[models.Conversion]:
    if isinstance(amount, float):
        raise TypeError("amount: pass a Decimal, an int or a string, never a float")
    query = params(from_=from_, to=to, amount=amount, side=side, at=at)
    return Call("GET", f"{PREFIX}/convert", models.Conversion.from_json, query)


def providers() -> Call[list[models.Provider]]:
    return Call("GET", f"{PREFIX}/providers", models.Provider.many)


def health() -> Call[models.Health]:
    return Call("GET", f"{PREFIX}/health", models.Health.from_json, ok=(200, 503))


def run_fetch() -> Call[models.FetchReport]:
    return Call("POST", f"{PREFIX}/tasks/run", models.FetchReport.from_json, write=True)
