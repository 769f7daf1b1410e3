from __future__ import annotations

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
