"""Rate values are exact and comparable in the database, on SQLite as on PostgreSQL."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db.models import Max, Min
from django.utils import timezone

from items.models import Item
from rates.models import Rate

pytestmark = pytest.mark.django_db

VALUES = ["54001.123456789012345678", "9.5", "100000", "0.000000000000000001", "99999.99"]


@pytest.fixture
def rates() -> list[Rate]:
    item = Item.objects.get(code="BTC-USD")
    now = timezone.now()
    return [
        Rate.objects.create(
            item=item, provider="binance", value=value, source_time=now, received_at=now
        )
        for value in VALUES
    ]


def test_values_come_back_digit_for_digit(rates: list[Rate]) -> None:
    stored = {
        row.normalize() for row in Rate.objects.values_list("value", flat=True).order_by("id")
    }
    assert stored == {Decimal(value).normalize() for value in VALUES}


def test_equality_ignores_trailing_zeros(rates: list[Rate]) -> None:
    assert Rate.objects.filter(value=Decimal("9.50")).count() == 1
    assert Rate.objects.filter(value=Decimal("100000.000")).count() == 1
    assert Rate.objects.filter(value__in=[Decimal("9.5"), Decimal("99999.99")]).count() == 2


def test_order_and_ranges_are_numeric(rates: list[Rate]) -> None:
    ordered = [
        str(v.normalize()) for v in Rate.objects.order_by("value").values_list("value", flat=True)
    ]
    assert ordered == ["1E-18", "9.5", "54001.123456789012345678", "99999.99", "1E+5"]
    assert Rate.objects.filter(value__gt=Decimal("10")).count() == 3
    assert Rate.objects.filter(value__lte=Decimal("9.5")).count() == 2
    bounds = Rate.objects.aggregate(low=Min("value"), high=Max("value"))
    assert bounds == {"low": Decimal("0.000000000000000001"), "high": Decimal("100000")}


def test_a_value_with_all_38_digits_comes_back_unrounded() -> None:
    # More digits than Decimal's default 28-digit context: nothing on the way may round them.
    widest = Decimal("12345678901234567890.123456789012345678")
    item = Item.objects.get(code="BTC-USD")
    now = timezone.now()
    rate = Rate.objects.create(
        item=item, provider="binance", value=widest, source_time=now, received_at=now
    )
    assert Rate.objects.values_list("value", flat=True).get(pk=rate.pk) == widest
    assert Rate.objects.filter(value=widest).count() == 1
