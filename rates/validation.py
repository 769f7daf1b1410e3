"""The checks every quote passes before Kurs believes it (docs/rates.md#validation).

Each check raises :class:`QuoteRejected` with a short machine-readable ``reason`` (the label of
the ``kurs_quotes_rejected_total`` metric) and a human ``detail`` (the log line).

- ``not_a_number``: the value is NaN or infinite (providers turn unparsable prices into NaN).
- ``not_positive``: zero or negative.
- ``out_of_range``: does not fit the history column (38 digits, 18 of them decimals), i.e. it
  is 10^20 or more, or rounds to zero at 18 decimal places.
- ``future``: the source time is ahead of our clock by more than :data:`CLOCK_SKEW`. Exchanges
  stamp quotes with their own clocks; a few seconds of disagreement between two NTP-synced
  hosts is normal, anything beyond that is a broken clock or a broken payload.
- ``stale``: the source time is older than the provider's freshness window.
- ``jump``: the value moved more than ``KURS_MAX_JUMP`` (a fraction) from the last accepted
  value of the pair, and no other provider's recent quote agrees with it within that limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Context, Decimal, InvalidOperation

# Tolerated disagreement between an exchange's clock and ours.
CLOCK_SKEW = timedelta(seconds=5)

# The Rate columns are NUMERIC(38, 18).
DECIMAL_PLACES = 18
STEP = Decimal(1).scaleb(-DECIMAL_PLACES)
UPPER_BOUND = Decimal(10) ** (38 - DECIMAL_PLACES)
# Wide enough that quantizing anything below UPPER_BOUND is exact.
_CONTEXT = Context(prec=40)


class QuoteRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def checked_value(value: object) -> Decimal:
    """The value as it will be stored (quantized to 18 places), or QuoteRejected."""
    if not isinstance(value, Decimal) or not value.is_finite():
        raise QuoteRejected("not_a_number", f"value {value!r} is not a finite number")
    if value <= 0:
        raise QuoteRejected("not_positive", f"value {value} is not positive")
    if value >= UPPER_BOUND:
        raise QuoteRejected("out_of_range", f"value {value} is 10^20 or more")
    try:
        stored = value.quantize(STEP, context=_CONTEXT)
    except InvalidOperation:  # pragma: no cover - excluded by the bound above
        raise QuoteRejected("out_of_range", f"value {value} does not fit") from None
    if stored == 0:
        raise QuoteRejected("out_of_range", f"value {value} rounds to 0 at 18 decimal places")
    return stored


def optional_value(value: Decimal | None) -> Decimal | None:
    """A bid or ask as stored; an unusable one is dropped rather than failing the quote."""
    if value is None:
        return None
    try:
        return checked_value(value)
    except QuoteRejected:
        return None


def check_time(source_time: datetime, *, now: datetime, freshness: float) -> None:
    if source_time.tzinfo is None:
        raise QuoteRejected("future", f"source time {source_time} has no time zone")
    if source_time > now + CLOCK_SKEW:
        ahead = (source_time - now).total_seconds()
        raise QuoteRejected("future", f"source time is {ahead:.1f}s in the future")
    age = (now - source_time).total_seconds()
    if age > freshness:
        raise QuoteRejected("stale", f"quote is {age:.0f}s old (limit {freshness:g}s)")


def relative_change(value: Decimal, reference: Decimal) -> Decimal:
    return abs(value - reference) / reference


def check_jump(
    value: Decimal,
    *,
    reference: Decimal | None,
    confirmations: Iterable[Decimal],
    max_jump: float,
) -> None:
    """Reject a move beyond ``max_jump`` from ``reference`` that no other provider confirms.

    ``confirmations`` are other providers' recent values for the same pair; one of them within
    ``max_jump`` of the new value is a second opinion that the market really moved.
    """
    if reference is None:
        return
    limit = Decimal(str(max_jump))
    change = relative_change(value, reference)
    if change <= limit:
        return
    if any(relative_change(value, other) <= limit for other in confirmations):
        return
    raise QuoteRejected(
        "jump",
        f"{value} moves {change:.1%} from the last accepted {reference.normalize()} "
        f"(limit {limit:.0%}) and no other provider confirms it",
    )
