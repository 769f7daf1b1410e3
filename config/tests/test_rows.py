"""Prepared inserts (`config.rows`): every column of their model written, as the ORM would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from config import rows
from items.models import Item
from rates.models import CURRENT_ROWS, RATE_ROWS, SERVED_ROWS, CurrentRate, Rate, ServedRate
from realtime.models import OUTBOX_ROWS, OutboxEvent


def test_every_prepared_insert_writes_every_column_of_its_model() -> None:
    """A field added to a model must be added to its insert: nothing leaves a column to chance."""
    models = {insert.model for insert in rows.ALL}
    assert {Rate, CurrentRate, ServedRate, OutboxEvent} <= models
    for insert in rows.ALL:
        assert insert.unwritten() == set(), insert.model.__name__
        fields = {field.attname for field in insert.model._meta.concrete_fields}
        assert set(insert.columns) <= fields, insert.model.__name__


def test_a_served_version_is_prepared_by_the_fields_of_its_current_rate() -> None:
    """The served log copies a current rate's prepared values (`rates.servedlog.record_all`):
    its leading columns are the current rate's, and each is the same field (`ServedValue`)."""
    shared = CURRENT_ROWS.columns
    assert SERVED_ROWS.columns[: len(shared)] == shared
    by_name = {
        model: {field.attname: field for field in model._meta.concrete_fields}
        for model in (CurrentRate, ServedRate)
    }
    for name in shared:
        current, served = by_name[CurrentRate][name], by_name[ServedRate][name]
        if name == "item_id":  # the key of one, a plain reference in the other: Item's id alike
            assert current.target_field == served.target_field  # type: ignore[attr-defined]
            continue
        # The same type and options (a default, which preparing never reads, aside).
        (_, path, args, options), (_, served_path, served_args, served_options) = (
            field.deconstruct() for field in (current, served)
        )
        options.pop("default", None)
        served_options.pop("default", None)
        assert (path, args, options) == (served_path, served_args, served_options), name


def history_row(item: Item, **changes: Any) -> dict[str, Any]:
    at = datetime(2026, 12, 7, 9, 0, 0, 123456, tzinfo=UTC)
    return {
        "item_id": item.pk,
        "provider": "binance",
        "value": Decimal("54001.123456789012345678"),
        "bid": Decimal("54001.1"),
        "ask": None,
        "source_time": at,
        "received_at": at,
        "derived": False,
        "mode": "priority",
        "n_sources": 1,
        "dispersion_bps": None,
        **changes,
    }


@pytest.mark.django_db
def test_a_prepared_row_reads_back_as_the_orm_writes_it() -> None:
    item = Item.objects.create(base="ZZA", quote="USD", code="ZZA-USD")
    assert RATE_ROWS.write([history_row(item, provider="prepared")]) == 1
    Rate.objects.create(**history_row(item, provider="orm"))
    prepared, orm = (
        Rate.objects.filter(provider=name).values().get() for name in ("prepared", "orm")
    )
    for row in (prepared, orm):
        del row["id"], row["provider"]
    assert prepared == orm


@pytest.mark.django_db
def test_a_prepared_upsert_rewrites_every_column_but_the_key() -> None:
    item = Item.objects.create(base="ZZB", quote="USD", code="ZZB-USD")
    at = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    current = {
        "item_id": item.pk,
        "provider": "binance",
        "value": Decimal(1),
        "bid": None,
        "ask": None,
        "source_time": at,
        "checked_at": at,
        "received_at": at,
        "derived": False,
        "status": "live",
        "version": 1,
        "mode": "priority",
        "n_sources": 1,
        "dispersion_bps": None,
        "route": [],
        "sources": [{"provider": "binance"}],
    }
    CURRENT_ROWS.write([current])
    CURRENT_ROWS.write([{**current, "value": Decimal(2), "version": 2, "status": "failover"}])
    row = CurrentRate.objects.get(item=item)
    assert (row.value, row.version, row.status, row.sources) == (
        Decimal(2),
        2,
        "failover",
        [{"provider": "binance"}],
    )


def test_a_row_without_one_of_the_columns_is_refused() -> None:
    with pytest.raises(KeyError):
        RATE_ROWS.prepare({"item_id": 1}, connection)


@pytest.mark.django_db
def test_the_rows_keep_their_order_in_the_automatic_key() -> None:
    """The outbox is relayed in `id` order: the order the events were written in."""
    now = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    ids = [uuid.uuid4() for _ in range(50)]
    OUTBOX_ROWS.write(
        {
            "event_id": event_id,
            "subject": "kurs.test",
            "payload": "{}",
            "created_at": now,
            "delivered_at": None,
        }
        for event_id in ids
    )
    assert list(OutboxEvent.objects.order_by("id").values_list("event_id", flat=True)) == ids
