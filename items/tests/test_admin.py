"""The admin renders and saves for a superuser, and its writes go through the services."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.contrib.messages import get_messages
from django.test import Client

from items import services
from items.models import ApiKey, Item

pytestmark = pytest.mark.django_db

# Test runs publish under their own prefix (config/test_settings.py).
PREFIX = settings.KURS_NATS_PREFIX

Events = list[tuple[str, dict[str, Any]]]


@pytest.mark.parametrize(
    "url",
    [
        "/admin/",
        "/admin/items/item/",
        "/admin/items/item/?is_active__exact=0",
        "/admin/items/item/?q=btc",
        "/admin/items/item/add/",
        "/admin/items/apikey/",
        "/admin/items/apikey/add/",
    ],
)
def test_admin_pages_render(admin_client: Client, url: str) -> None:
    assert admin_client.get(url).status_code == 200


def test_the_change_page_shows_base_and_quote_read_only(admin_client: Client) -> None:
    item = Item.objects.get(code="BTC-USD")
    response = admin_client.get(f"/admin/items/item/{item.id}/change/")
    assert response.status_code == 200
    assert b'name="base"' not in response.content
    assert b'name="name"' in response.content


def test_adding_an_item_in_the_admin_normalises_and_publishes(
    admin_client: Client, published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/items/item/add/",
            {"base": "sol", "quote": "usd", "name": "Solana", "is_active": "on"},
        )
    assert response.status_code == 302, response.content
    item = Item.objects.get(code="SOL-USD")
    assert item.name == "Solana"
    assert [subject for subject, _ in published_events] == [f"{PREFIX}.items.created"]


def test_the_admin_refuses_an_invalid_item(admin_client: Client) -> None:
    count = Item.objects.count()
    response = admin_client.post("/admin/items/item/add/", {"base": "b!", "quote": "usd"})
    assert response.status_code == 200  # the form again, with errors
    assert b"errorlist" in response.content
    assert Item.objects.count() == count


def test_editing_an_item_in_the_admin_publishes_an_update(
    admin_client: Client, published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    item = Item.objects.get(code="ETH-RUB")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            f"/admin/items/item/{item.id}/change/", {"name": "Ether in roubles"}
        )
    assert response.status_code == 302
    item.refresh_from_db()
    assert (item.name, item.is_active) == ("Ether in roubles", False)  # unchecked box = False
    [(subject, envelope)] = published_events
    assert subject == f"{PREFIX}.items.updated"
    assert envelope["data"]["name"] == "Ether in roubles"


def test_the_deactivate_action_publishes_per_item(
    admin_client: Client, published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    ids = list(Item.objects.filter(base="BTC").values_list("id", flat=True))
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/items/item/", {"action": "deactivate", "_selected_action": ids}
        )
    assert response.status_code == 302
    assert not Item.objects.filter(id__in=ids, is_active=True).exists()
    assert [subject for subject, _ in published_events] == [f"{PREFIX}.items.updated"] * len(ids)


def test_deleting_in_the_admin_publishes_a_deletion(
    admin_client: Client, published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    item = Item.objects.get(code="USDTTRC-RUB")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/admin/items/item/{item.id}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Item.objects.filter(pk=item.id).exists()
    assert published_events[-1][1]["data"] == {"id": item.id, "code": "USDTTRC-RUB"}


def test_creating_a_key_in_the_admin_shows_the_raw_key_once(admin_client: Client) -> None:
    response = admin_client.post("/admin/items/apikey/add/", {"name": "grafana"})
    assert response.status_code == 302
    api_key = ApiKey.objects.get(name="grafana")
    [message] = [str(m) for m in get_messages(response.wsgi_request) if "Copy it now" in str(m)]
    raw_key = message.rsplit(" ", 1)[-1]
    assert services.hash_api_key(raw_key) == api_key.key_hash
    # Never in a cookie: Django's default message storage signs cookies but does not encrypt them.
    cookies = " ".join(f"{c.key}={c.value}" for c in response.cookies.values())
    assert "messages" not in response.cookies, cookies
    assert raw_key.split("_", 1)[-1][:12] not in cookies
    # The message is shown on the next page only; after that the raw key exists nowhere.
    first = admin_client.get("/admin/items/apikey/")
    assert raw_key.encode() in first.content
    for url in ("/admin/items/apikey/", f"/admin/items/apikey/{api_key.id}/change/"):
        assert raw_key.encode() not in admin_client.get(url).content


def test_the_revoke_action_revokes(admin_client: Client) -> None:
    api_key, _ = services.api_key_create(name="leaked")
    response = admin_client.post(
        "/admin/items/apikey/", {"action": "revoke", "_selected_action": [api_key.id]}
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
