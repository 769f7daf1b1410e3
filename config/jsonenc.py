"""The one JSON encoder (docs/api.md#json-shapes): Decimals as exact JSON numbers, UTC times as
ISO-8601 with `Z`; and its decoder for request bodies: JSON numbers with a fraction or exponent as
exact Decimals.

REST answers, NATS payloads, WebSocket frames and command output all use `dumps`, so the same
value has the same bytes on every surface. It imports nothing of the apps: anything may use it.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Context, Decimal
from typing import Any

import simplejson


def _plain_decimal(value: Decimal) -> Decimal:
    """54000.000123000 -> 54000.000123; 5.4E+4 -> 54000: numbers as people write them.

    normalize() rounds to its context's precision (28 digits by default) and a stored rate has
    38, so it gets a context as wide as the value itself: trailing zeros go, no digit does.
    """
    if not value.is_finite():
        return value
    exact = Context(prec=max(1, len(value.as_tuple().digits)))
    return Decimal(format(value.normalize(exact), "f"))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(data: Any) -> str:
    """JSON with Decimals as exact JSON numbers (docs/api.md#json-shapes: never floats)."""
    return simplejson.dumps(
        _normalise(data), use_decimal=True, default=_json_default, separators=(",", ":")
    )


def _normalise(data: Any) -> Any:
    if isinstance(data, Decimal):
        return _plain_decimal(data)
    if isinstance(data, dict):
        return {key: _normalise(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_normalise(value) for value in data]
    return data


def loads(text: str | bytes) -> Any:
    """JSON with fractional numbers as exact Decimals: `0.1` is Decimal("0.1"), not a float.

    `NaN` and `Infinity` (not JSON, but Python's json accepts them) become Decimals too, so the
    schema that reads them rejects them with a field name instead of a parse error.
    """
    return json.loads(text, parse_float=Decimal, parse_constant=Decimal)
