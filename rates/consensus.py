"""Consensus pricing: the median of every independent fresh source, outliers left out. Pure.

The rule and its parameters are documented, with the spreads that justify them, in
docs/rates.md#consensus-pricing. `price` takes the sources one pair has now (each a value with
an optional bid and ask) and returns the served value, the sources it rests on, the ones it left
out and why, and the evidence every payload carries (`n_sources`, `dispersion_bps`).

Everything is Decimal: medians of exact quotes, thresholds and basis points included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

# A source is an outlier when its distance from the median exceeds
# max(K × 1.4826 × MAD, FLOOR × median): K scaled MADs (1.4826 × MAD estimates a normal
# standard deviation), but never less than FLOOR of the value, so that sources agreeing to a few
# basis points (a MAD near zero) do not exclude a neighbour for a normal spread.
K = Decimal(3)
MAD_SCALE = Decimal("1.4826")
FLOOR = Decimal("0.01")  # 1 % = 100 bp
OUTLIER = "outlier"
_BP = Decimal(10000)
_WIDE = 80  # exact arithmetic on 38-digit decimals before the one rounding of a result
_BPS_STEP = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Source:
    """One provider's fresh quote for the pair (a cross rate `a+b` counts as one source)."""

    provider: str
    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    source_time: datetime
    excluded: bool = False
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Priced:
    """What a pricing rule made of a pair's sources."""

    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    # Every source considered, included first, each saying whether and why it was left out.
    sources: tuple[Source, ...]
    n_sources: int
    dispersion_bps: Decimal | None

    @property
    def excluded(self) -> tuple[Source, ...]:
        return tuple(source for source in self.sources if source.excluded)


def median(values: Sequence[Decimal]) -> Decimal:
    """The median of a non-empty sequence (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    with localcontext() as context:
        context.prec = _WIDE
        return (ordered[middle - 1] + ordered[middle]) / 2


def quantile(ordered: Sequence[Decimal], q: Decimal) -> Decimal:
    """The q-quantile of sorted values by linear interpolation (numpy's default, type 7)."""
    with localcontext() as context:
        context.prec = _WIDE
        position = (len(ordered) - 1) * q
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dispersion_bps(values: Sequence[Decimal], value: Decimal) -> Decimal | None:
    """Half the spread between the 25th and 75th percentile of `values`, in bp of `value`;
    None with fewer than two values."""
    if len(values) < 2 or value <= 0:
        return None
    ordered = sorted(values)
    with localcontext() as context:
        context.prec = _WIDE
        half = (quantile(ordered, Decimal("0.75")) - quantile(ordered, Decimal("0.25"))) / 2
        return (half / value * _BP).quantize(_BPS_STEP)


def spread_bps(bid: Decimal | None, ask: Decimal | None, value: Decimal) -> Decimal | None:
    """(ask − bid) in bp of `value`; None without both sides."""
    if bid is None or ask is None or value <= 0:
        return None
    with localcontext() as context:
        context.prec = _WIDE
        return ((ask - bid) / value * _BP).quantize(_BPS_STEP)


def outlier_threshold(values: Sequence[Decimal], centre: Decimal) -> Decimal:
    """The distance from `centre` beyond which a value is an outlier."""
    with localcontext() as context:
        context.prec = _WIDE
        mad = median([abs(value - centre) for value in values])
        return max(K * MAD_SCALE * mad, FLOOR * centre)


def _median_side(sources: Sequence[Source], side: str, step: Decimal) -> Decimal | None:
    sides = [getattr(source, side) for source in sources if getattr(source, side) is not None]
    return median(sides).quantize(step, rounding=ROUND_HALF_EVEN) if sides else None


def price(sources: Sequence[Source], *, places: int) -> Priced:
    """The consensus of a non-empty list of sources: the median of those within the outlier
    threshold of the median of all; bid and ask the medians of the included sources' sides.

    A median of an even count (the mean of the middle two) is rounded half-even to `places`,
    the stored precision."""
    step = Decimal(1).scaleb(-places)
    values = [source.value for source in sources]
    centre = median(values)
    threshold = outlier_threshold(values, centre)
    judged = [
        source
        if abs(source.value - centre) <= threshold
        else Source(
            source.provider,
            source.value,
            source.bid,
            source.ask,
            source.source_time,
            excluded=True,
            reason=OUTLIER,
        )
        for source in sources
    ]
    included = [source for source in judged if not source.excluded]
    value = median([source.value for source in included]).quantize(step, rounding=ROUND_HALF_EVEN)
    return Priced(
        value=value,
        bid=_median_side(included, "bid", step),
        ask=_median_side(included, "ask", step),
        sources=tuple(included + [source for source in judged if source.excluded]),
        n_sources=len(included),
        dispersion_bps=dispersion_bps([source.value for source in included], value),
    )


def with_markup(
    value: Decimal, bid: Decimal | None, ask: Decimal | None, markup_bps: Decimal, *, places: int
) -> tuple[Decimal, Decimal]:
    """(buy, sell): ask × (1 + markup) and bid × (1 − markup), the value in place of a missing
    side, rounded half-even to `places`."""
    step = Decimal(1).scaleb(-places)
    with localcontext() as context:
        context.prec = _WIDE
        markup = markup_bps / _BP
        buy = (value if ask is None else ask) * (1 + markup)
        sell = (value if bid is None else bid) * (1 - markup)
    return buy.quantize(step, ROUND_HALF_EVEN), sell.quantize(step, ROUND_HALF_EVEN)
