from __future__ import annotations

import importlib

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError

from items.models import Item, normalise_asset, validate_asset

pytestmark = pytest.mark.django_db


def test_it_seeds_the_eight_default_pairs() -> None:
    codes = set(Item.objects.values_list("code", flat=True))
    expected = {f"{b}-{q}" for b in ("BTC", "ETH", "USDTTRC", "USDTERC") for q in ("RUB", "USD")}
    assert expected <= codes
    assert Item.objects.filter(code__in=expected, is_active=True).count() == 8


def test_it_derives_the_code_from_base_and_quote() -> None:
    item = Item.objects.create(base="SOL", quote="EUR")
    assert item.code == "SOL-EUR"
    assert str(item) == "SOL-EUR"


def test_it_normalises_asset_codes() -> None:
    assert normalise_asset("  btc ") == "BTC"


@pytest.mark.parametrize("bad", ["B", "TOOLONGASSETCODE", "BT-C", "ЕТН", "", "BTC "])
def test_it_rejects_malformed_asset_codes(bad: str) -> None:
    with pytest.raises(ValidationError):
        validate_asset(bad)


def test_full_clean_rejects_equal_base_and_quote() -> None:
    item = Item(base="usd", quote="USD")
    with pytest.raises(ValidationError) as excinfo:
        item.full_clean()
    assert "quote" in excinfo.value.message_dict


def test_the_database_rejects_equal_base_and_quote() -> None:
    with pytest.raises(IntegrityError):
        Item.objects.create(base="XRP", quote="XRP")


def test_the_database_rejects_a_duplicate_code() -> None:
    Item.objects.create(base="DOGE", quote="USD")
    with pytest.raises(IntegrityError):
        Item.objects.create(base="DOGE", quote="USD")


@pytest.mark.parametrize("name", ["a\x00b", "line\nbreak", "bell\x07", "c1\x85", "del\x7f"])
def test_a_name_with_control_characters_is_invalid(name: str) -> None:
    item = Item(base="SOL", quote="EUR", name=name)
    with pytest.raises(ValidationError, match="control characters"):
        item.full_clean()
    Item(base="SOL", quote="EUR", name="Solana / € (Ünïcödé is fine)").full_clean()


def test_the_migration_cleans_names_written_before_the_validator() -> None:
    from django.apps import apps

    clean_names = importlib.import_module("items.migrations.0003_item_name_printable").clean_names
    Item.objects.filter(code="BTC-USD").update(name="Bit\x1bcoin\n\x85 / USD\x07")
    Item.objects.filter(code="ETH-USD").update(name="Ether / USD")
    clean_names(apps, None)
    names = dict(Item.objects.filter(code__in=["BTC-USD", "ETH-USD"]).values_list("code", "name"))
    assert names == {"BTC-USD": "Bit coin / USD", "ETH-USD": "Ether / USD"}
