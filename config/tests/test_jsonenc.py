"""The one JSON encoder and its request-body decoder keep every digit of a decimal."""

from __future__ import annotations

from decimal import Decimal

from config.jsonenc import dumps, loads

WIDEST = "12345678901234567890.123456789012345678"  # 38 digits, a Rate column's width


def test_it_writes_all_38_digits_and_drops_only_trailing_zeros() -> None:
    assert dumps({"v": Decimal(WIDEST)}) == '{"v":' + WIDEST + "}"
    assert dumps([Decimal("54000.000123000"), Decimal("5.4E+4"), Decimal("0E-18")]) == (
        "[54000.000123,54000,0]"
    )


def test_it_reads_fractional_numbers_as_exact_decimals() -> None:
    body = loads('{"amount": 0.1, "big": ' + WIDEST + ', "count": 3}')
    assert body == {"amount": Decimal("0.1"), "big": Decimal(WIDEST), "count": 3}
    assert isinstance(body["amount"], Decimal)
    assert isinstance(body["count"], int)


def test_nan_and_infinity_arrive_as_decimals_for_the_schema_to_refuse() -> None:
    body = loads('{"a": NaN, "b": Infinity, "c": -Infinity}')
    assert all(isinstance(value, Decimal) and not value.is_finite() for value in body.values())
