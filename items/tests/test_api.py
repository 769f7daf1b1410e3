"""The items endpoints, success and error paths (docs/api.md#items). SQLite and PostgreSQL."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from edge.tests.asgi import call
from items import services
from items.models import ITEM_FIELDS, ApiKey, Item
from items.schemas import ItemOut
from items.services import item_to_event
from rates.models import Rate
from rates.tests.support import store_current

pytestmark = pytest.mark.django_db

# Test runs publish under their own prefix (config/test_settings.py).
PREFIX = settings.KURS_NATS_PREFIX

Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def api_key() -> str:
    _, raw_key = services.api_key_create(name="tests")
    return raw_key


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"HTTP_X_API_KEY": api_key}


def post(client: Client, path: str, body: Any, **headers: Any) -> Any:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **headers)


def patch(client: Client, path: str, body: Any, **headers: Any) -> Any:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.patch(path, data=data, content_type="application/json", **headers)


def assert_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


# --- list -----------------------------------------------------------------------------------
def test_it_lists_items_with_count_and_pagination(client: Client) -> None:
    response = client.get("/api/v1/items?limit=3&offset=2")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == Item.objects.count()
    ids = list(Item.objects.order_by("id").values_list("id", flat=True))
    assert [item["id"] for item in body["items"]] == ids[2:5]
    assert set(body["items"][0]) == {
        "id", "code", "base", "quote", "name", "is_active", "pricing", "markup_bps",
        "created_at", "updated_at",
    }  # fmt: skip


def test_it_filters_items_by_is_active(client: Client) -> None:
    Item.objects.filter(code="BTC-RUB").update(is_active=False)
    inactive = client.get("/api/v1/items?is_active=false").json()
    assert [item["code"] for item in inactive["items"]] == ["BTC-RUB"]
    assert inactive["count"] == 1
    active = client.get("/api/v1/items?is_active=true").json()
    assert "BTC-RUB" not in {item["code"] for item in active["items"]}


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"),
     ("offset=-1", "offset"), ("offset=11174710960812527190016", "offset"),
     ("is_active=maybe", "is_active")],
)  # fmt: skip
def test_it_rejects_bad_list_parameters(client: Client, query: str, field: str) -> None:
    body = assert_error(client.get(f"/api/v1/items?{query}"), 422)
    assert body["errors"][0]["field"] == field
    assert field in body["detail"]


# --- get ------------------------------------------------------------------------------------
def test_it_gets_an_item_with_its_latest_rate(client: Client) -> None:
    item = Item.objects.get(code="BTC-USD")
    # binance (first priority) is down: the owner wrote bybit as the current rate.
    store_current(
        item,
        "bybit",
        "54001.123456789012345678",
        bid=Decimal("54001"),
        ask=Decimal("54002.5"),
        status="failover",
        version=3,
    )
    response = client.get(f"/api/v1/items/{item.id}")
    assert response.status_code == 200
    body = response.json()
    assert body["code"] == "BTC-USD"
    assert (body["latest"]["provider"], body["latest"]["status"]) == ("bybit", "failover")
    assert body["latest"]["version"] == 3
    # Full precision, as a JSON number: never rounded through a float.
    assert b'"value":54001.123456789012345678' in response.content
    assert b'"bid":54001,' in response.content
    assert body["latest"]["ask"] == 54002.5


def test_an_item_without_rates_has_latest_null(client: Client) -> None:
    item = Item.objects.get(code="ETH-RUB")
    assert client.get(f"/api/v1/items/{item.id}").json()["latest"] is None


@pytest.mark.parametrize("item_id", ["999999", "0", "99999999999999999999999"])
def test_it_answers_404_json_for_unknown_ids(client: Client, item_id: str) -> None:
    assert_error(client.get(f"/api/v1/items/{item_id}"), 404)


@pytest.mark.parametrize("path", ["/api/v1/items/abc", "/api/v1/items/-1", "/api/v1/nothing-here"])
async def test_an_unknown_api_path_is_a_json_404(path: str) -> None:
    answer = await call(path)  # through the edge, which makes Django's 404 JSON
    assert answer.status == 404
    assert answer.json() == {"detail": "not found"}


# --- create ---------------------------------------------------------------------------------
def test_it_creates_an_item(
    client: Client, auth: dict[str, str], published_events: Events,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        response = post(
            client, "/api/v1/items", {"base": "sol", "quote": "Usd", "name": "Sol"}, **auth
        )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["code"], body["base"], body["quote"], body["name"]) == (
        "SOL-USD",
        "SOL",
        "USD",
        "Sol",
    )
    assert body["is_active"] is True
    assert Item.objects.filter(code="SOL-USD").exists()
    assert [subject for subject, _ in published_events] == [f"{PREFIX}.items.created"]


def test_it_creates_an_inactive_item(client: Client, auth: dict[str, str]) -> None:
    response = post(
        client, "/api/v1/items", {"base": "XMR", "quote": "RUB", "is_active": False}, **auth
    )
    assert response.status_code == 201
    assert Item.objects.get(code="XMR-RUB").is_active is False


def test_a_duplicate_code_is_409(client: Client, auth: dict[str, str]) -> None:
    body = assert_error(post(client, "/api/v1/items", {"base": "btc", "quote": "usd"}, **auth), 409)
    assert "BTC-USD" in body["detail"]
    assert Item.objects.filter(code="BTC-USD").count() == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"quote": "USD"}, "base"),
        ({"base": "BTC"}, "quote"),
        ({"base": 123, "quote": "USD"}, "base"),
        ({"base": "B", "quote": "USD"}, "base"),
        ({"base": "BTC", "quote": "US-D"}, "quote"),
        ({"base": "BTC", "quote": "TOOLONGASSETCODE"}, "quote"),
        ({"base": "BTC", "quote": "EUR", "is_active": "yes"}, "is_active"),
        ({"base": "BTC", "quote": "EUR", "name": 5}, "name"),
        ({"base": "BTC", "quote": "EUR", "name": "x" * 101}, "name"),
        ({"base": "BTC", "quote": "EUR", "code": "BTC-EUR"}, "code"),
        ({"base": "USD", "quote": "usd"}, "quote"),
    ],
)
def test_it_rejects_invalid_items_naming_the_field(
    client: Client, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    count = Item.objects.count()
    error = assert_error(post(client, "/api/v1/items", body, **auth), 422)
    assert field in {entry["field"] for entry in error["errors"]}
    assert Item.objects.count() == count


@pytest.mark.parametrize("raw", ['{"base": "BTC",', "not json", "[1, 2]", '"BTC-EUR"', ""])
def test_it_rejects_malformed_bodies(client: Client, auth: dict[str, str], raw: str) -> None:
    response = post(client, "/api/v1/items", raw, **auth)
    assert response.status_code in (400, 422)
    assert_error(response, response.status_code)


# --- auth -----------------------------------------------------------------------------------
def test_writes_without_a_key_are_401(client: Client) -> None:
    item = Item.objects.get(code="BTC-USD")
    assert_error(post(client, "/api/v1/items", {"base": "SOL", "quote": "USD"}), 401)
    assert_error(patch(client, f"/api/v1/items/{item.id}", {"name": "x"}), 401)
    assert_error(client.delete(f"/api/v1/items/{item.id}"), 401)
    assert not Item.objects.filter(code="SOL-USD").exists()
    assert Item.objects.filter(pk=item.id, name="Bitcoin / USD").exists()


def test_an_unknown_key_is_401(client: Client) -> None:
    response = post(client, "/api/v1/items", {"base": "SOL", "quote": "USD"}, HTTP_X_API_KEY="nope")
    assert_error(response, 401)
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_key_is_401(client: Client) -> None:
    api_key, raw_key = services.api_key_create(name="gone")
    services.api_key_revoke(api_key=api_key)
    response = post(
        client, "/api/v1/items", {"base": "SOL", "quote": "USD"}, HTTP_X_API_KEY=raw_key
    )
    assert_error(response, 401)


def test_a_bearer_key_is_accepted_and_use_is_recorded(client: Client, api_key: str) -> None:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {api_key}"}
    assert (
        post(client, "/api/v1/items", {"base": "SOL", "quote": "USD"}, **headers).status_code == 201
    )
    assert ApiKey.objects.get(key_hash=services.hash_api_key(api_key)).last_used_at


def test_a_malformed_authorization_header_is_401(client: Client, api_key: str) -> None:
    response = post(
        client,
        "/api/v1/items",
        {"base": "SOL", "quote": "USD"},
        HTTP_AUTHORIZATION=f"Basic {api_key}",
    )
    assert_error(response, 401)


def test_keys_are_optional_when_not_required(client: Client, settings: Any) -> None:
    settings.KURS_API_KEYS_REQUIRED = False
    assert post(client, "/api/v1/items", {"base": "SOL", "quote": "USD"}).status_code == 201


# --- patch ----------------------------------------------------------------------------------
def test_it_patches_name_and_is_active(
    client: Client, auth: dict[str, str], published_events: Events,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    item = Item.objects.get(code="ETH-USD")
    with django_capture_on_commit_callbacks(execute=True):
        response = patch(
            client, f"/api/v1/items/{item.id}", {"name": "Ether", "is_active": False}, **auth
        )
    assert response.status_code == 200
    assert (response.json()["name"], response.json()["is_active"]) == ("Ether", False)
    item.refresh_from_db()
    assert (item.name, item.is_active) == ("Ether", False)
    assert [subject for subject, _ in published_events] == [f"{PREFIX}.items.updated"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"base": "XRP"}, "base"), ({"code": "X-Y"}, "code"), ({"is_active": "no"}, "is_active"),
     ({"name": ["a"]}, "name")],
)  # fmt: skip
def test_it_rejects_invalid_patches(
    client: Client, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    item = Item.objects.get(code="ETH-USD")
    error = assert_error(patch(client, f"/api/v1/items/{item.id}", body, **auth), 422)
    assert error["errors"][0]["field"] == field
    item.refresh_from_db()
    assert (item.base, item.is_active) == ("ETH", True)


def test_patching_an_unknown_item_is_404(client: Client, auth: dict[str, str]) -> None:
    assert_error(patch(client, "/api/v1/items/424242", {"name": "x"}, **auth), 404)


def test_patching_with_bad_json_is_400(client: Client, auth: dict[str, str]) -> None:
    item = Item.objects.get(code="ETH-USD")
    assert_error(patch(client, f"/api/v1/items/{item.id}", "{name", **auth), 400)


# --- delete ---------------------------------------------------------------------------------
def test_it_deletes_an_item_and_its_history(client: Client, auth: dict[str, Any]) -> None:
    item = Item.objects.get(code="USDTERC-RUB")
    now = timezone.now()
    Rate.objects.create(
        item=item, provider="coingecko", value="80.5", source_time=now, received_at=now
    )
    response = client.delete(f"/api/v1/items/{item.id}", **auth)
    assert response.status_code == 204
    assert response.content == b""
    assert not Item.objects.filter(pk=item.id).exists()
    assert not Rate.objects.filter(item_id=item.id).exists()
    assert_error(client.get(f"/api/v1/items/{item.id}"), 404)


def test_deleting_an_unknown_item_is_404(client: Client, auth: dict[str, Any]) -> None:
    assert_error(client.delete("/api/v1/items/424242", **auth), 404)


# --- rate limiting (the limit itself: edge/tests/test_security.py) ----------------------------
def test_reads_are_unlimited_by_default(client: Client) -> None:
    cache.clear()
    statuses = {client.get("/api/v1/items").status_code for _ in range(60)}
    assert statuses == {200}


# --- docs -----------------------------------------------------------------------------------
def test_it_serves_openapi_and_docs(client: Client) -> None:
    schema = client.get("/api/v1/openapi.json")
    assert schema.status_code == 200
    document = schema.json()
    assert document["info"]["version"] == "1"
    assert "/api/v1/items" in document["paths"]
    assert "/api/v1/items/{item_id}" in document["paths"]
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()
    # Offline installs work: the docs page loads its assets locally, not from a CDN.
    assert b"cdn.jsdelivr" not in docs.content


def test_the_item_schema_shows_exactly_the_public_fields() -> None:
    """One field list (items.models.ITEM_FIELDS) for the API, the detail and the events."""
    assert tuple(ItemOut.model_fields) == ITEM_FIELDS
    item = Item.objects.get(code="BTC-USD")
    assert tuple(item_to_event(item)) == ITEM_FIELDS


@pytest.mark.parametrize("name", ["a\u0000b", "line\nbreak", "bell\u0007", "c1\u0085", "del\u007f"])
def test_control_characters_in_a_name_are_a_422_not_a_500(
    client: Client, auth: dict[str, str], name: str
) -> None:
    created = post(client, "/api/v1/items", {"base": "SOL", "quote": "USD", "name": name}, **auth)
    assert "name" in assert_error(created, 422)["detail"]
    item = Item.objects.get(code="BTC-USD")
    patched = patch(client, f"/api/v1/items/{item.id}", {"name": name}, **auth)
    assert "name" in assert_error(patched, 422)["detail"]
    assert not Item.objects.filter(code="SOL-USD").exists()


@pytest.mark.parametrize("header", ["Basic kurs_secretvalue", "Token kurs_secretvalue"])
def test_a_key_sent_with_another_scheme_is_refused_and_never_logged(
    client: Client, settings: Any, caplog: pytest.LogCaptureFixture, header: str
) -> None:
    settings.DEBUG = True
    response = post(
        client, "/api/v1/items", {"base": "SOL", "quote": "USD"}, HTTP_AUTHORIZATION=header
    )
    assert_error(response, 401)
    assert "kurs_secretvalue" not in caplog.text


def test_a_bearer_key_is_accepted(client: Client, api_key: str) -> None:
    response = post(
        client,
        "/api/v1/items",
        {"base": "SOL", "quote": "USD"},
        HTTP_AUTHORIZATION=f"Bearer {api_key}",
    )
    assert response.status_code == 201
