from __future__ import annotations

import threading
from typing import Any

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from items import services
from items.exceptions import InvalidItem, ItemAlreadyExists
from items.models import ApiKey, Item
from rates.models import Rate

pytestmark = pytest.mark.django_db

# Test runs publish under their own prefix (config/test_settings.py).
PREFIX = settings.KURS_NATS_PREFIX

Events = list[tuple[str, dict[str, Any]]]


def test_it_creates_a_normalised_item_and_publishes_after_commit(
    published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        item = services.item_create(base=" sol ", quote="usd", name=" Solana ")
        # Nothing leaves before the transaction commits.
        assert published_events == []
    assert len(callbacks) == 1
    assert (item.base, item.quote, item.code, item.name) == ("SOL", "USD", "SOL-USD", "Solana")
    [(subject, envelope)] = published_events
    assert subject == f"{PREFIX}.items.created"
    assert envelope["type"] == "item.created"
    assert envelope["data"]["code"] == "SOL-USD"
    assert envelope["data"]["id"] == item.id
    assert set(envelope) == {"type", "data", "ts", "id"}
    assert envelope["ts"].endswith("Z")


def test_it_refuses_a_duplicate_code(published_events: Events) -> None:
    with pytest.raises(ItemAlreadyExists, match="BTC-USD already exists"):
        services.item_create(base="btc", quote="usd")
    assert Item.objects.filter(code="BTC-USD").count() == 1


@pytest.mark.parametrize(
    ("base", "quote", "field"),
    [("B", "USD", "base"), ("BTC", "U$D", "quote"), ("USD", "usd", "quote")],
)
def test_it_refuses_invalid_assets(base: str, quote: str, field: str) -> None:
    with pytest.raises(InvalidItem) as excinfo:
        services.item_create(base=base, quote=quote)
    assert excinfo.value.field == field
    assert not Item.objects.filter(base=base.upper(), quote=quote.upper()).exists()


def test_it_updates_only_what_changed(
    published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    item = Item.objects.get(code="ETH-USD")
    with django_capture_on_commit_callbacks(execute=True):
        services.item_update(item=item, name=item.name, is_active=True)
    assert published_events == []  # nothing changed, nothing to announce

    with django_capture_on_commit_callbacks(execute=True):
        services.item_update(item=item, is_active=False)
    item.refresh_from_db()
    assert item.is_active is False
    [(subject, envelope)] = published_events
    assert subject == f"{PREFIX}.items.updated"
    assert envelope["data"]["is_active"] is False


def test_it_deletes_an_item_with_its_history(
    published_events: Events, django_capture_on_commit_callbacks: Any
) -> None:
    from django.utils import timezone

    item = services.item_create(base="ADA", quote="USD")
    now = timezone.now()
    Rate.objects.create(
        item=item, provider="binance", value="0.5", source_time=now, received_at=now
    )
    item_id = item.id
    with django_capture_on_commit_callbacks(execute=True):
        services.item_delete(item=item)
    assert not Item.objects.filter(pk=item_id).exists()
    assert not Rate.objects.filter(item_id=item_id).exists()
    assert published_events[-1] == (
        f"{PREFIX}.items.deleted",
        {**published_events[-1][1], "data": {"id": item_id, "code": "ADA-USD"}},
    )


def test_it_stores_only_the_hash_of_an_api_key() -> None:
    api_key, raw_key = services.api_key_create(name="ci")
    assert raw_key.startswith("kurs_")
    assert len(raw_key) > 40
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert raw_key not in (stored.key_hash, stored.prefix, stored.name)
    assert stored.key_hash == services.hash_api_key(raw_key)
    assert raw_key.startswith(stored.prefix)


def test_a_revoked_key_is_inactive() -> None:
    api_key, _ = services.api_key_create(name="old")
    services.api_key_revoke(api_key=api_key)
    api_key.refresh_from_db()
    assert api_key.is_active is False


def test_an_api_key_needs_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        services.api_key_create(name="  ")


@pytest.mark.parametrize("name", ["a\x00b", "bell\x07", "c1\x9b"])
def test_a_name_with_control_characters_is_refused_by_the_services(name: str) -> None:
    with pytest.raises(InvalidItem) as refused:
        services.item_create(base="SOL", quote="EUR", name=name)
    assert refused.value.field == "name"
    item = Item.objects.get(code="BTC-USD")
    with pytest.raises(InvalidItem):
        services.item_update(item=item, name=name)
    assert not Item.objects.filter(code="SOL-EUR").exists()


@pytest.mark.django_db(transaction=True)
def test_a_delete_racing_the_owners_writes_of_rates_deletes_the_item() -> None:
    """The owner keeps committing rates of the item while a DELETE runs: the delete succeeds
    and takes every rate with the item; the owner's writes after it fail on the foreign key
    (the owner's own failure, retried decision by decision in production). Before the item's
    row was locked, a rate committed between the cascade and the item's deletion broke the
    foreign key at the delete's commit: a 500 on DELETE (found by make test-prod)."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: SQLite runs one writer at a time")
    outcomes: list[str] = []
    for round_ in range(20):
        item = services.item_create(base=f"ZZ{round_:02d}", quote="USD")
        writing = threading.Event()
        refused: list[Exception] = []

        def owner(
            item: Item = item,
            writing: threading.Event = writing,
            refused: list[Exception] = refused,
        ) -> None:
            try:
                while True:
                    now = timezone.now()
                    try:
                        with transaction.atomic():
                            Rate.objects.create(
                                item=item, provider="binance", value=1, source_time=now,
                                received_at=now,
                            )  # fmt: skip
                    except IntegrityError as exc:
                        refused.append(exc)  # the item is gone: the owner's write fails
                        return
                    writing.set()
            finally:
                connection.close()

        thread = threading.Thread(target=owner)
        thread.start()
        assert writing.wait(30)
        try:
            services.item_delete(item=item)
            outcomes.append("deleted")
        except IntegrityError as exc:
            outcomes.append(f"delete failed: {exc}")
            Item.objects.filter(pk=item.pk).delete()  # the owner's loop ends with its item
        thread.join(30)
        assert not thread.is_alive()
        assert len(refused) == 1, (outcomes, refused)
        assert not Item.objects.filter(pk=item.pk).exists()
        assert not Rate.objects.filter(item_id=item.pk).exists()
    assert outcomes == ["deleted"] * 20
