"""Central Bank of Russia official daily rates, from the ``/daily_json.js`` mirror.

Format: shared/reference/provider-formats.md section 3. ``Valute`` maps a currency code to
``{"Nominal": 100, "Value": 23.5491, ...}``: RUB for ``Nominal`` units, so one unit is
``Value / Nominal`` (exact in Decimal: nominals are powers of ten).

Decisions:
- Only X-RUB is quoted. RUB-X would be ``1 / rate``, a rounded number the bank never published;
  the cross-rate layer derives it (and labels it derived) when someone asks.
- ``source_time`` is the file's publication time. ``Date`` is the day the rates take effect, which
  is usually *tomorrow* 11:30 MSK at the time the file appears (the bank sets them a day ahead),
  so using it would make every fresh file look like it comes from the future; ``Timestamp`` is
  when the mirror published it. The earlier of the two is the moment the values were known.
- Freshness is 4 days: the bank publishes on business days only (Friday's file serves until
  Tuesday's), plus one public holiday of margin. The long January holidays exceed it, and then
  CBR quotes are rejected as stale, which is the honest answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from rates.providers.base import (
    NAN,
    Listing,
    Pair,
    Provider,
    ProviderMalformed,
    Quote,
    to_decimal,
)

RUB = "RUB"


class CBRProvider(Provider):
    name: ClassVar[str] = "cbr"
    supports_stream: ClassVar[bool] = False
    freshness: ClassVar[float | None] = 4 * 86400.0

    # The bank's list changes rarely; a pair outside it simply gets no quote from fetch().
    CURRENCIES: ClassVar[frozenset[str]] = frozenset(
        [
            "AUD",
            "AZN",
            "GBP",
            "AMD",
            "BYN",
            "BGN",
            "BRL",
            "HUF",
            "VND",
            "HKD",
            "GEL",
            "DKK",
            "AED",
            "USD",
            "EUR",
            "EGP",
            "INR",
            "IDR",
            "KZT",
            "CAD",
            "QAR",
            "KGS",
            "CNY",
            "MDL",
            "NZD",
            "NOK",
            "PLN",
            "RON",
            "XDR",
            "SGD",
            "TJS",
            "THB",
            "TRY",
            "TMT",
            "UZS",
            "UAH",
            "CZK",
            "SEK",
            "CHF",
            "RSD",
            "ZAR",
            "KRW",
            "JPY",
        ]
    )

    def supports(self, pair: Pair) -> bool:
        return self.asset(pair.quote) == RUB and self.asset(pair.base) in self.CURRENCIES

    def wanted(self, pairs: Sequence[Pair]) -> list[tuple[Pair, str]]:
        return [(pair, self.asset(pair.base)) for pair in pairs if self.supports(pair)]

    async def fetch(self, pairs: Sequence[Pair]) -> list[Quote]:
        wanted = self.wanted(pairs)
        if not wanted:
            return []
        body, _ = await self.get_json("/daily_json.js")
        return parse_daily(body, wanted)

    async def listing(self) -> Listing:
        # The daily file is the whole table already.
        body, _ = await self.get_json("/daily_json.js")
        parse_daily(body, [])  # the file's shape, checked once
        return Listing(self.name, lambda pairs: parse_daily(body, self.wanted(pairs)))


def _parse_time(raw: object) -> datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else None


def per_unit(entry: dict[str, Any]) -> Decimal:
    """RUB for one unit: ``Value / Nominal``; NaN if either is missing or not a number."""
    value, nominal = to_decimal(entry.get("Value")), to_decimal(entry.get("Nominal"))
    try:
        return value / nominal if nominal > 0 else NAN
    except InvalidOperation:
        return NAN


def parse_daily(body: Any, wanted: Sequence[tuple[Pair, str]]) -> list[Quote]:
    """Quotes for ``(pair, currency code)`` from a daily_json body; unlisted codes get none."""
    if not isinstance(body, dict) or not isinstance(body.get("Valute"), dict):
        raise ProviderMalformed(f"daily_json without a Valute object: {body!r:.80}")
    published = [
        t for t in (_parse_time(body.get("Date")), _parse_time(body.get("Timestamp"))) if t
    ]
    if not published:
        raise ProviderMalformed("daily_json without a parsable Date/Timestamp")
    when = min(published)
    valutes = body["Valute"]
    quotes: list[Quote] = []
    for pair, code in wanted:
        entry = valutes.get(code)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ProviderMalformed(f"Valute entry for {code} is not an object")
        quotes.append(
            Quote(
                provider=CBRProvider.name, pair=pair.code, value=per_unit(entry), source_time=when
            )
        )
    return quotes
