"""TradingView's UDF protocol, the pure part (docs/api.md#tradingview-udf): resolutions and the
bars they ask for, the aggregation of candles into wider bars, and the UDF shapes of a symbol,
a search hit, bars and an error. No database, no clock: `rates.udf_selectors` reads, and the
routes of `rates.udf_api` only parse and answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from items.models import ASSET_CODE_RE
from rates.exceptions import InvalidQuery
from rates.selectors import Candle, CandleInterval

# The most bars one history answer holds. A longer range keeps its latest bars (the UDF
# adapter's `limitedServerResponse` with `expectedOrder: "latestFirst"` asks for the rest);
# a day of 1-minute bars fits in one answer.
MAX_BARS = 2000
# The most hits one search answers.
MAX_SEARCH = 100
DEFAULT_SEARCH = 30
EXCHANGE = "Kurs"
SYMBOL_TYPE = "crypto"


@dataclass(frozen=True, slots=True)
class Resolution:
    """A UDF resolution: its bar width, and the native candle interval its bars are made of."""

    name: str
    seconds: int
    interval: CandleInterval

    @property
    def factor(self) -> int:
        """How many native candles make one bar (1 where the width is native)."""
        return self.seconds // self.interval.seconds


RESOLUTIONS: dict[str, Resolution] = {
    r.name: r
    for r in (
        Resolution("1", 60, CandleInterval.M1),
        Resolution("5", 300, CandleInterval.M5),
        Resolution("15", 900, CandleInterval.M5),
        Resolution("30", 1800, CandleInterval.M5),
        Resolution("60", 3600, CandleInterval.H1),
        Resolution("240", 14400, CandleInterval.H1),
        Resolution("1D", 86400, CandleInterval.D1),
    )
}
# Spellings the charting library also uses for the same widths.
_ALIASES = {"D": "1D", "1H": "60", "4H": "240"}
SUPPORTED_RESOLUTIONS = list(RESOLUTIONS)


def parse_resolution(text: str) -> Resolution:
    name = _ALIASES.get(text.upper(), text.upper())
    resolution = RESOLUTIONS.get(name)
    if resolution is None:
        raise InvalidQuery(
            "resolution", f"unsupported resolution {text!r}; one of {', '.join(RESOLUTIONS)}"
        )
    return resolution


# Unix seconds a request may name: 1970 to 3000 (a bar's end stays far inside a datetime).
MAX_TIME = 32503680000
# A larger countback is refused; up to it, the window keeps the latest MAX_BARS slots.
MAX_COUNTBACK = 1_000_000


def parse_int(field: str, text: str, *, low: int, high: int) -> int:
    """A whole number in [low, high] from a query parameter, else InvalidQuery naming it."""
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidQuery(field, f"must be a whole number, not {text[:40]!r}") from None
    if not low <= value <= high:
        raise InvalidQuery(field, f"must be between {low} and {high}")
    return value


def parse_symbol(text: str) -> str:
    """`BTC-USD`, `btc-usd` or `Kurs:BTC-USD` (the library may prefix the exchange) -> BTC-USD."""
    code = text.rsplit(":", 1)[-1].strip().upper()
    if not code:
        raise InvalidQuery("symbol", "is required, e.g. BTC-USD")
    base, _, quote = code.partition("-")
    if not (ASSET_CODE_RE.match(base) and ASSET_CODE_RE.match(quote)):
        raise InvalidQuery("symbol", f"{text[:40]!r} is not a pair code like BTC-USD")
    return code


def parse_search(text: str) -> str:
    """A search's text: its first 40 characters, trimmed; a NUL cannot be searched for."""
    if "\x00" in text:
        raise InvalidQuery("query", "must not contain NUL characters")
    return text.strip()[:40]


@dataclass(frozen=True, slots=True)
class Window:
    """The bars a history request asks for: those starting in [first, last], `step` apart."""

    first: int
    last: int
    step: int

    @property
    def since(self) -> datetime:
        return datetime.fromtimestamp(self.first, tz=UTC)

    @property
    def until(self) -> datetime:
        """The end of the last bar: rows are read up to it, so every bar is whole."""
        return datetime.fromtimestamp(self.last + self.step, tz=UTC)


def history_window(
    resolution: Resolution, *, start: int | None, end: int, countback: int | None
) -> Window:
    """The bars of `history?from=&to=&countback=`: those whose start time t is in [from, to)
    (the library asks for adjacent ranges; a bar belongs to exactly one of them), or, with
    `countback`, the `countback` bar slots before `to` (`from` is then ignored, as the protocol
    says). At most MAX_BARS slots: a longer range keeps its latest ones.
    """
    step = resolution.seconds
    if end <= 0:
        raise InvalidQuery("to", "must be after 1970-01-01")
    last = (end - 1) // step * step
    if countback is not None:
        first = last - (countback - 1) * step
    elif start is None:
        raise InvalidQuery("from", "is required without countback")
    elif start >= end:
        raise InvalidQuery("from", "must be earlier than to")
    else:
        first = -(-start // step) * step
    first = max(first, last - (MAX_BARS - 1) * step, 0)
    if first > last:
        raise InvalidQuery("from", "the range holds no bar start: widen it")
    return Window(first, last, step)


def bar_start(at: datetime, step: int) -> int:
    """The start, in Unix seconds, of the `step`-wide bar holding `at`."""
    seconds = int(at.timestamp())
    return seconds - seconds % step


def aggregate(candles: Iterable[Candle], step: int) -> list[Candle]:
    """Candles (oldest first) merged into `step`-wide bars aligned to the epoch: the first
    open, the extremes, the last close, the quotes summed. Native-width candles pass as they are.
    """
    bars: list[Candle] = []
    for candle in candles:
        start = bar_start(candle.t, step)
        if bars and bar_start(bars[-1].t, step) == start:
            bar = bars[-1]
            bars[-1] = Candle(
                t=bar.t,
                open=bar.open,
                high=max(bar.high, candle.high),
                low=min(bar.low, candle.low),
                close=candle.close,
                n=bar.n + candle.n,
            )
        else:
            bars.append(
                Candle(
                    t=datetime.fromtimestamp(start, tz=UTC),
                    open=candle.open,
                    high=candle.high,
                    low=candle.low,
                    close=candle.close,
                    n=candle.n,
                )
            )
    return bars


def bars_payload(bars: Sequence[Candle]) -> dict[str, Any]:
    """`{"s": "ok", "t", "o", "h", "l", "c", "v"}`: times in Unix seconds, exact values, and as
    volume the number of quotes in the bar (a tick volume: rates have no traded volume)."""
    return {
        "s": "ok",
        "t": [int(bar.t.timestamp()) for bar in bars],
        "o": [bar.open for bar in bars],
        "h": [bar.high for bar in bars],
        "l": [bar.low for bar in bars],
        "c": [bar.close for bar in bars],
        "v": [bar.n for bar in bars],
    }


def no_data_payload(next_time: int | None) -> dict[str, Any]:
    """`{"s": "no_data"}`, with `nextTime`: the start of the closest earlier bar, if any."""
    return {"s": "no_data"} if next_time is None else {"s": "no_data", "nextTime": next_time}


def error_payload(body: dict[str, Any]) -> dict[str, Any]:
    """A Kurs error body (`detail`, maybe `errors`) that the UDF adapter reads too: it looks at
    `s` and shows `errmsg`, whatever the status (docs/api.md#tradingview-udf)."""
    return {"s": "error", "errmsg": str(body.get("detail", "error")), **body}


def config_payload() -> dict[str, Any]:
    """`/config`: what the library asks first (its `onReady` configuration)."""
    return {
        "supported_resolutions": SUPPORTED_RESOLUTIONS,
        "supports_search": True,
        "supports_group_request": False,
        "supports_marks": False,
        "supports_timescale_marks": False,
        "supports_time": True,
        "exchanges": [{"value": EXCHANGE, "name": EXCHANGE, "desc": "Kurs exchange rates"}],
        "symbols_types": [{"name": SYMBOL_TYPE, "value": SYMBOL_TYPE}],
    }


# Digits a price is shown with: this many significant digits, between 2 and 10 decimals.
_SIGNIFICANT = 8


def pricescale(value: Decimal | None) -> int:
    """10 to the number of decimals that shows `value` with _SIGNIFICANT digits (100 when the
    pair has no rate yet): 54000.12 -> 1000, 0.0123456 -> 10**9."""
    if value is None or value == 0:
        return 100
    whole: int = value.copy_abs().adjusted() + 1  # digits before the point (<= 0 below 0.1)
    decimals: int = min(10, max(2, _SIGNIFICANT - whole))
    return int(10**decimals)  # int ** int is typed Any (a negative power is a float)


def symbol_payload(
    *, code: str, name: str, base: str, quote: str, value: Decimal | None
) -> dict[str, Any]:
    """`/symbols?symbol=`: the library's symbol info. Rates never close: a 24x7 session in UTC,
    intraday and daily bars at every resolution of RESOLUTIONS (built here, not by the library).
    """
    return {
        "name": code,
        "ticker": code,
        "full_name": f"{EXCHANGE}:{code}",
        "description": name or f"{base} / {quote}",
        "type": SYMBOL_TYPE,
        "exchange": EXCHANGE,
        "listed_exchange": EXCHANGE,
        "currency_code": quote,
        "session": "24x7",
        "timezone": "Etc/UTC",
        "format": "price",
        "minmov": 1,
        "pricescale": pricescale(value),
        "has_intraday": True,
        "has_daily": True,
        "has_weekly_and_monthly": False,
        "intraday_multipliers": [r for r in SUPPORTED_RESOLUTIONS if r != "1D"],
        "supported_resolutions": SUPPORTED_RESOLUTIONS,
        "volume_precision": 0,
        "visible_plots_set": "ohlcv",
        "data_status": "streaming",
    }


def search_hit(*, code: str, name: str, base: str, quote: str) -> dict[str, str]:
    """One `/search` result."""
    return {
        "symbol": code,
        "full_name": f"{EXCHANGE}:{code}",
        "description": name or f"{base} / {quote}",
        "exchange": EXCHANGE,
        "ticker": code,
        "type": SYMBOL_TYPE,
    }
