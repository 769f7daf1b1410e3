"""edge.caching through the edge: the Cache-Control of each kind of answer."""

from __future__ import annotations

import json

import pytest
from django.conf import LazySettings

from edge.caching import IN_FRONT, cache_control
from edge.tests.asgi import call
from items import services
from items.models import Item
from rates.tests.support import store_current

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def item() -> Item:
    btc = Item.objects.get_or_create(base="BTC", quote="USD")[0]
    store_current(btc, "binance", "54000.5")
    return btc


@pytest.fixture
def key() -> str:
    return services.api_key_create(name="tests")[1]


READS = [
    ("/api/v1/items", 200, "no-cache"),
    ("/api/v1/items/{id}", 200, "no-cache"),
    ("/api/v1/items/{id}/rates/latest", 200, IN_FRONT),
    ("/api/v1/items/{id}/rates", 200, "max-age=1"),
    ("/api/v1/items/{id}/candles", 200, "max-age=1"),
    ("/api/v1/providers", 200, "no-cache"),
    ("/metrics", 200, "no-store"),
    ("/api/v1/openapi.json", 200, "max-age=60"),
    ("/api/v1/courses", 200, IN_FRONT),
    ("/api/v1/rates/BTC/USD", 200, IN_FRONT),
    ("/api/v1/courses?direction=NO-SUCH", 422, "no-store"),
    ("/api/v1/rates/BTC/BTC", 422, "no-store"),
    ("/api/v1/items/999999", 404, "no-store"),
    ("/api/v1/items/{id}/rates?limit=0", 422, "no-store"),
    ("/api/v1/no-such-thing", 404, "no-store"),
]


@pytest.mark.parametrize(("path", "status", "expected"), READS)
async def test_each_read_says_how_long_it_may_be_kept(
    item: Item, path: str, status: int, expected: str
) -> None:
    path, _, query = path.format(id=item.id).partition("?")
    answer = await call(path, query.encode())
    assert answer.status == status, answer.body
    assert answer.header("Cache-Control") == expected.encode()


def test_health_is_never_stored() -> None:
    assert cache_control("GET", "/api/v1/health", 200) == "no-store"
    assert cache_control("GET", "/api/v1/health", 503) == "no-store"


async def test_writes_and_refusals_are_never_stored(
    item: Item, key: str, settings: LazySettings
) -> None:
    json_body = [(b"content-type", b"application/json")]
    authorized = [*json_body, (b"x-api-key", key.encode())]
    created = await call(
        "/api/v1/items",
        headers=authorized,
        method="POST",
        body=json.dumps({"base": "ETH", "quote": "EUR"}).encode(),
    )
    assert created.status == 201
    converted = await call(
        "/api/v1/convert",
        headers=json_body,
        method="POST",
        body=json.dumps({"from": "BTC", "to": "BTC", "amount": 1}).encode(),
    )
    assert converted.status == 200
    unauthorized = await call(f"/api/v1/items/{item.id}", method="DELETE")
    assert unauthorized.status == 401
    not_allowed = await call("/api/v1/items", method="PUT")
    assert not_allowed.status == 405
    deleted = await call(
        f"/api/v1/items/{created.json()['id']}", headers=authorized, method="DELETE"
    )
    assert deleted.status == 204
    settings.KURS_RATE_LIMIT = (1, 60)
    await call("/api/v1/providers")
    throttled = await call("/api/v1/providers")
    assert throttled.status == 429
    for answer in (created, converted, unauthorized, not_allowed, deleted, throttled):
        assert answer.header("Cache-Control") == b"no-store"


def test_pages_outside_the_api_are_left_alone() -> None:
    assert cache_control("GET", "/", 200) is None
    assert cache_control("GET", "/admin/", 200) is None
    assert cache_control("GET", "/api/v1/courses", 422) == "no-store"


async def test_a_304_says_what_its_200_says(item: Item) -> None:
    first = await call("/api/v1/courses")
    etag = first.header("ETag")
    assert first.status == 200
    assert etag is not None
    again = await call("/api/v1/courses", headers=[(b"if-none-match", etag)])
    assert again.status == 304
    assert again.header("Cache-Control") == first.header("Cache-Control") == IN_FRONT.encode()
