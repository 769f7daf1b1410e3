"""config.caching through the middleware: the Cache-Control of each kind of answer."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from config.caching import cache_control
from items import services
from items.models import Item
from rates.tests.support import store_current

pytestmark = pytest.mark.django_db


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
    ("/api/v1/items/{id}/rates/latest", 200, "no-cache"),
    ("/api/v1/items/{id}/rates", 200, "max-age=1"),
    ("/api/v1/items/{id}/candles", 200, "max-age=1"),
    ("/api/v1/providers", 200, "no-cache"),
    ("/api/v1/health", None, "no-store"),  # 200 or 503, whatever this machine's NATS says
    ("/metrics", 200, "no-store"),
    ("/api/v1/openapi.json", 200, "max-age=60"),
    ("/api/v1/courses", 200, "max-age=1"),  # its own, unchanged (config.fastpath answers alike)
    ("/api/v1/items/999999", 404, "no-store"),
    ("/api/v1/items/{id}/rates?limit=0", 422, "no-store"),
    ("/api/v1/no-such-thing", 404, "no-store"),
]


@pytest.mark.parametrize(("path", "status", "expected"), READS)
def test_each_read_says_how_long_it_may_be_kept(
    client: Client, item: Item, path: str, status: int | None, expected: str
) -> None:
    response = client.get(path.format(id=item.id))
    if status is not None:
        assert response.status_code == status, response.content
    assert response["Cache-Control"] == expected


def test_writes_and_refusals_are_never_stored(client: Client, item: Item, key: str) -> None:
    body = json.dumps({"base": "ETH", "quote": "EUR"})
    created = client.post(
        "/api/v1/items", body, content_type="application/json", HTTP_X_API_KEY=key
    )
    assert created.status_code == 201
    converted = client.post(
        "/api/v1/convert",
        json.dumps({"from": "BTC", "to": "BTC", "amount": 1}),
        content_type="application/json",
    )
    assert converted.status_code == 200
    unauthorized = client.delete(f"/api/v1/items/{item.id}")
    assert unauthorized.status_code == 401
    not_allowed = client.put("/api/v1/items")
    assert not_allowed.status_code == 405
    deleted = client.delete(f"/api/v1/items/{created.json()['id']}", HTTP_X_API_KEY=key)
    assert deleted.status_code == 204
    for response in (created, converted, unauthorized, not_allowed, deleted):
        assert response["Cache-Control"] == "no-store"


def test_pages_outside_the_api_are_left_alone() -> None:
    assert cache_control("GET", "/", 200) is None
    assert cache_control("GET", "/admin/", 200) is None
    assert cache_control("GET", "/api/v1/courses", 422) is None  # /courses sets its own
