from __future__ import annotations

import datetime as dt
import re
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Annotated, Literal

from django.conf import settings
from ninja import Schema
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from items.models import ASSET_CODE_RE, normalise_asset
from items.schemas import ASSET_CODE_INPUT_PATTERN, ASSET_CODE_INPUT_RE, ItemOut
from rates.selectors import CandleInterval
from rates.validation import DECIMAL_PLACES, UPPER_BOUND

# Decimals leave as exact JSON numbers (config.jsonenc), not as pydantic's default strings.
JsonDecimal = Annotated[Decimal, WithJsonSchema({"type": "number"})]

# What the query parameters take: ISO-8601 text only. pydantic alone would read `0.5` or `1e9`
# as Unix timestamps, which the schema (`format: date-time`, `format: date`) does not allow.
_ISO_DATETIME_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}")
_ISO_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _iso_datetime_text(value: object) -> object:
    if isinstance(value, str) and not _ISO_DATETIME_RE.match(value):
        raise ValueError("expected an ISO-8601 date and time, e.g. 2026-01-31T12:00:00Z")
    if not isinstance(value, str | datetime):
        raise ValueError("expected an ISO-8601 date and time (a string)")
    return value


def _iso_date_text(value: object) -> object:
    if isinstance(value, str) and not _ISO_DATE_RE.match(value):
        raise ValueError("expected a day as YYYY-MM-DD")
    if not isinstance(value, str | dt.date):
        raise ValueError("expected a day as YYYY-MM-DD (a string)")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_datetime_text)]
IsoDate = Annotated[dt.date, BeforeValidator(_iso_date_text)]
AT_DESCRIPTION = (
    "an instant (ISO-8601, UTC): answer with the version served then (docs/api.md#point-in-time)"
)
EXPAND_DESCRIPTION = (
    "`sources`: every source the rate considered (with `at`, each provider's quote at that instant)"
)
Expand = Literal["sources"]
# A provider name, or a cross rate's `a+b` (an unencoded + arrives as a space); also what the
# candles answer echoes in its Kurs-Provider header, so no control character gets that far.
PROVIDER_PATTERN = r"^[a-z0-9_+ ]+$"


class RateOut(Schema):
    """One history row (docs/api.md#json-shapes)."""

    provider: str
    value: JsonDecimal
    bid: JsonDecimal | None
    ask: JsonDecimal | None
    source_time: datetime
    received_at: datetime


class RouteLegOut(Schema):
    pair: str = Field(description="the pair as its provider quoted it")
    provider: str
    value: JsonDecimal
    source_time: datetime


RateStatus = Literal["live", "failover", "stale", "thin", "depeg"]


class SourceOut(Schema):
    """One source a rate considered (`expand=sources`); at an instant (`at`), each provider's
    last quote then, from the history."""

    provider: str
    value: JsonDecimal
    bid: JsonDecimal | None
    ask: JsonDecimal | None
    source_time: datetime
    age_s: float = Field(
        description="seconds since the quote (at an instant: from its last history row to then)"
    )
    excluded: bool = Field(
        description="left out of the value (an outlier, by priority, or stale at the instant)"
    )
    reason: str | None = Field(
        description="`outlier`, `priority`, `stale` (at an instant), or null when included"
    )


class EvidenceOut(Schema):
    """What every current-rate payload says of how its value was priced
    (docs/rates.md#consensus-pricing)."""

    mode: Literal["priority", "consensus"]
    n_sources: int = Field(description="the sources the value rests on: 1 under priority")
    dispersion_bps: JsonDecimal | None = Field(
        description="half the spread between the included sources' 25th and 75th percentile, "
        "in bp of the value; null with one source"
    )
    bid: JsonDecimal | None
    ask: JsonDecimal | None
    spread_bps: JsonDecimal | None = Field(description="(ask - bid) in bp of the value")
    buy: JsonDecimal | None = Field(
        description="ask × (1 + markup), the value without an ask; null for an identity"
    )
    sell: JsonDecimal | None = Field(
        description="bid × (1 − markup), the value without a bid; null for an identity"
    )
    sources: list[SourceOut] | None = Field(
        None,
        description="with `expand=sources`: every source considered",
        exclude_if=lambda value: value is None,
    )


class CurrentRateOut(EvidenceOut):
    """The rate the service stands behind now (docs/api.md#json-shapes, `latest`)."""

    provider: str = Field(description="the serving provider (`a+b` for a cross rate)")
    value: JsonDecimal
    source_time: datetime = Field(description="the exchange's time of this value")
    checked_at: datetime = Field(description="the last time a source confirmed this value")
    received_at: datetime = Field(description="when Kurs first received this value")
    age_s: float = Field(description="seconds since checked_at")
    status: RateStatus
    derived: bool
    route: list[RouteLegOut] = Field(description="a cross rate's legs; empty otherwise")
    version: int = Field(description="+1 on every published change of the pair")


class ItemDetailOut(ItemOut):
    latest: CurrentRateOut | None


class RateListOut(Schema):
    items: list[RateOut]
    count: int = Field(description="rows matching the filters, counted up to 10000 (at least)")


class RateListQuery(Schema):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=500)
    since: IsoDateTime | None = Field(None, description="received at or after (ISO-8601, UTC)")
    until: IsoDateTime | None = Field(
        None, description="received before (ISO-8601, UTC); later than `since`"
    )
    date: IsoDate | None = Field(None, description="a UTC day, YYYY-MM-DD")
    provider: str | None = Field(None, min_length=1, max_length=32, pattern=PROVIDER_PATTERN)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)

    @field_validator("date")
    @classmethod
    def _whole_day(cls, value: dt.date | None) -> dt.date | None:
        if value is not None and value >= dt.date.max:
            raise ValueError("out of range: the day must end before year 10000")
        return value

    @field_validator("until")
    @classmethod
    def _after_since(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        since = info.data.get("since")
        if value is not None and since is not None and value <= since:
            raise ValueError("must be later than since")
        return value


class TaskRunOut(Schema):
    stored: int
    providers: dict[str, str]
    duration_ms: int


class ExclusionOut(Schema):
    """Since when a consensus has left the provider out of some pair without interruption, and
    the pairs it is out of now (docs/api.md#get-apiv1providers)."""

    since: datetime
    pairs: list[str]


class ProviderOut(Schema):
    name: str
    priority: int
    state: Literal["closed", "open", "half_open"]
    last_success: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    errors_5m: int
    streaming: bool
    excluded: ExclusionOut | None


class PegEvidenceOut(Schema):
    source: str
    value: JsonDecimal


class PegOut(Schema):
    """A peg of KURS_PEGS as the owner measures it (docs/api.md#get-apiv1pegs)."""

    asset: str
    reference: str
    band: JsonDecimal
    value: JsonDecimal | None
    deviation: JsonDecimal | None
    state: Literal["ok", "broken", "unknown"]
    since: datetime | None
    evidence: list[PegEvidenceOut]


# --- Errors, as config/api.py shapes them (declared so that OpenAPI documents them) -----------
class ErrorOut(Schema):
    detail: str


# What `rates.courses.parse_query` accepts, said in the OpenAPI: blanks that str.strip() removes
# around each value, any case, a comma-separated list of pairs; a configured provider or a cross
# rate's legs joined by `+` (or a space, as an unencoded `+` arrives).
_BLANKS = r"[\t-\r\x1c-\x1f ]*"
_PAIR_TEXT = r"[A-Za-z0-9]{2,12}-[A-Za-z0-9]{2,12}"
DIRECTION_PATTERN = rf"^{_BLANKS}({_PAIR_TEXT})?{_BLANKS}(,{_BLANKS}({_PAIR_TEXT})?{_BLANKS})*$"


def _any_case(name: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in name)


def exchanger_pattern(providers: list[str]) -> str:
    one = "(" + "|".join(_any_case(name) for name in providers) + ")"
    return rf"^{_BLANKS}({one}([+ ]{one})*)?{_BLANKS}$"


class CoursesQueryIn(Schema):
    """The filters of `/courses`; `rates.courses.parse_query` validates and normalises them
    (the patterns below only document it: the edge's route table answers the same without it)."""

    direction: list[str] = Field(
        default_factory=list,
        description="a pair, e.g. BTC-USD (repeatable, or comma-separated); none: all active pairs",
        examples=[["BTC-USD", "ETH-RUB"]],
        json_schema_extra={"items": {"type": "string", "pattern": DIRECTION_PATTERN}},
    )
    exchanger: str | None = Field(
        None,
        description="a configured provider: only the courses it serves now",
        examples=["binance"],
        json_schema_extra={"pattern": exchanger_pattern(settings.KURS_PROVIDERS)},
    )


class CourseOut(Schema):
    direction: str = Field(..., examples=["BTC-USD"])
    value: JsonDecimal = Field(..., examples=[54000.000123])
    exchanger: str | None = Field(
        None, description="the course's provider; only when the answer's exchanger is `mixed`"
    )
    stale: bool | None = Field(
        None, description="`true` when no fresh quote serves the pair (the last value is kept)"
    )


class CoursesOut(Schema):
    exchanger: str | None = Field(
        ...,
        description="the provider that served every course, `mixed`, or null with no course",
        examples=["binance"],
    )
    courses: list[CourseOut]


class FieldErrorOut(Schema):
    field: str
    message: str


class ValidationErrorOut(Schema):
    detail: str
    errors: list[FieldErrorOut]


def errors(*codes: int) -> dict[int, type[Schema]]:
    """The documented error answers of a route, as `config.api` shapes them: 422 names the
    fields, every other error is `{"detail"}` (400 malformed JSON, 401 key, 404, 409, 429...)."""
    return {code: ValidationErrorOut if code == 422 else ErrorOut for code in codes}


def _empty_is_absent(value: object) -> object:
    # docs/api.md#query-parameters: `?since=&provider=` means the parameters are absent.
    return None if value == "" else value


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    # A time without an offset is read as UTC, the only zone Kurs speaks.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise ValueError("out of range") from None


def _asset_code(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected an asset code (a string)")
    code = normalise_asset(value)
    if not ASSET_CODE_INPUT_RE.match(value) or not ASSET_CODE_RE.match(code):
        raise ValueError("not an asset code: use 2 to 12 letters A-Z or digits")
    return code


AssetCode = Annotated[
    str,
    BeforeValidator(_asset_code),
    WithJsonSchema({"type": "string", "pattern": ASSET_CODE_INPUT_PATTERN}),
]


# --- Candles -----------------------------------------------------------------------------------
class CandleQuery(Schema):
    model_config = ConfigDict(extra="forbid")

    interval: CandleInterval = Field(
        CandleInterval.M1, description="candle width; candles are aligned to the Unix epoch (UTC)"
    )
    since: IsoDateTime | None = Field(
        None,
        description="from this time (ISO-8601, UTC), rounded down to a candle start; default "
        "`until` minus 6 h (1m), 1 day (5m), 7 days (1h) or 90 days (1d). At most 1000 candles "
        "from `since` to `until`: a longer range is a 422, never truncated",
    )
    until: IsoDateTime | None = Field(
        None,
        description="received before this time (ISO-8601, UTC), later than `since` (else 422); "
        "default now",
    )
    provider: str | None = Field(
        None,
        min_length=1,
        max_length=32,
        pattern=PROVIDER_PATTERN,
        description="whose history; default the highest-priority provider with rows in range",
    )

    _absent = field_validator("since", "until", "provider", mode="before")(_empty_is_absent)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)


class CandleOut(Schema):
    t: datetime = Field(description="the candle's start (UTC)")
    open: JsonDecimal
    high: JsonDecimal
    low: JsonDecimal
    close: JsonDecimal
    n: int = Field(description="rates in the candle")


# --- Any pair, and conversions -----------------------------------------------------------------
class PairPath(Schema):
    base: AssetCode = Field(examples=["AUD"])
    quote: AssetCode = Field(examples=["CAD"])

    @field_validator("quote")
    @classmethod
    def _differs(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("base"):
            raise ValueError("must differ from base")
        return value


class ExpandQuery(Schema):
    expand: Literal["sources"] | None = Field(
        None, description="`sources`: list every source the rate considered"
    )

    _absent = field_validator("expand", mode="before")(_empty_is_absent)


class PairRateOut(EvidenceOut):
    pair: str = Field(examples=["AUD-CAD"])
    value: JsonDecimal
    provider: str = Field(description="a provider, or `a+b` for a cross rate's legs")
    source_time: datetime
    age_s: float
    derived: bool
    stale: bool
    status: RateStatus
    route: list[RouteLegOut] = Field(description="a derived rate's legs; empty otherwise")


# An amount as text (the query, or a JSON string): plain decimal notation, ASCII digits only
# (\d and Decimal() would also take other scripts' digits, "١٢" as 12), at most 20 digits before
# the point (leading zeros aside: below 10^20) and 18 after. The pattern is the rule itself, so
# that the OpenAPI says exactly what is accepted.
AMOUNT_TEXT_PATTERN = r"^\+?(0*[0-9]{1,20}(\.[0-9]{0,18})?|\.[0-9]{1,18})$"
_AMOUNT_TEXT_RE = re.compile(AMOUNT_TEXT_PATTERN)
_DECIMAL_TEXT_RE = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)$")
_MAX_AMOUNT_TEXT = 64
_AMOUNT_STEP = Decimal(1).scaleb(-DECIMAL_PLACES)
_WIDE = Context(prec=80)


def _amount_text(text: str) -> Decimal:
    if len(text) > _MAX_AMOUNT_TEXT:
        raise ValueError(f"too long (at most {_MAX_AMOUNT_TEXT} characters)")
    if not _DECIMAL_TEXT_RE.fullmatch(text):
        raise ValueError("expected a decimal number in plain notation, e.g. 0.5")
    if text.startswith("-"):
        raise ValueError("must not be negative")
    if not _AMOUNT_TEXT_RE.fullmatch(text):
        if Decimal(text) >= UPPER_BOUND:
            raise ValueError("must be less than 10^20")
        raise ValueError(f"at most {DECIMAL_PLACES} decimal places")
    return Decimal(text)


def _amount_number(value: int | Decimal) -> Decimal:
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount < 0:
        raise ValueError("must not be negative")
    if amount >= UPPER_BOUND:
        raise ValueError("must be less than 10^20")
    if int(amount.as_tuple().exponent) < -DECIMAL_PLACES:
        # A JSON number is a value, not a text: one with more places (a float's binary tail,
        # 1e-30) is rounded once, half to even, as the result is; the text form is held to it.
        amount = amount.quantize(_AMOUNT_STEP, rounding=ROUND_HALF_EVEN, context=_WIDE)
    return amount


def _amount(value: object) -> Decimal:
    """An exact Decimal from a string or a JSON number (parsed as Decimal, never as a float)."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError('expected a decimal number, e.g. 0.5 or "0.5"')
    amount = _amount_text(value) if isinstance(value, str) else _amount_number(value)
    return amount if amount else Decimal(0)


_AMOUNT_TEXT_SCHEMA = {
    "type": "string",
    "pattern": AMOUNT_TEXT_PATTERN,
    "maxLength": _MAX_AMOUNT_TEXT,
    "examples": ["0.5"],
    "description": "a decimal in plain notation, 0 <= amount < 10^20, at most 18 decimal places",
}
# The query's amount is text; a JSON body's may also be a number (read exactly, never through a
# float; more than 18 decimal places are rounded half to even).
AmountText = Annotated[Decimal, BeforeValidator(_amount), WithJsonSchema(_AMOUNT_TEXT_SCHEMA)]
Amount = Annotated[
    Decimal,
    BeforeValidator(_amount),
    WithJsonSchema(
        {
            "anyOf": [
                _AMOUNT_TEXT_SCHEMA,
                {"type": "number", "minimum": 0, "exclusiveMaximum": 1e20},
            ],
            "examples": ["0.5"],
            "description": "a decimal, 0 <= amount < 10^20: a string (at most 18 decimal "
            "places) or a JSON number (read exactly; rounded to 18 decimal places)",
        }
    ),
]


Side = Literal["buy", "sell", "mid"]


class ConvertIn(Schema):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: AssetCode = Field(alias="from", examples=["BTC"])
    to: AssetCode = Field(examples=["RUB"])
    amount: Amount
    side: Side = Field(
        "mid",
        description="`buy` (at the rate's `buy`: ask plus markup), `sell` (at `sell`: bid "
        "less markup) or `mid` (the value)",
    )
    # docs/api.md#point-in-time: the conversion at the rate served at that instant.
    at: IsoDateTime | None = Field(None, description=AT_DESCRIPTION)
    expand: Expand | None = Field(None, description=EXPAND_DESCRIPTION)

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)


class ConvertQuery(ConvertIn):
    amount: AmountText


class ConvertOut(EvidenceOut):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    amount: JsonDecimal
    side: Side
    rate: JsonDecimal = Field(description="1 unit of `from` in `to`, at `side`")
    result: JsonDecimal = Field(description="amount × rate, rounded half-even to 18 decimal places")
    provider: str | None = Field(description="null when from = to (rate 1)")
    source_time: datetime | None
    age_s: float | None
    derived: bool
    stale: bool
    status: RateStatus
    route: list[RouteLegOut] = Field(description="a derived rate's legs; empty otherwise")


# --- Point in time (docs/api.md#point-in-time) ---------------------------------------------------
class PointInTimeQuery(Schema):
    at: IsoDateTime | None = Field(None, description=AT_DESCRIPTION)
    expand: Expand | None = Field(None, description=EXPAND_DESCRIPTION)

    _absent = field_validator("at", "expand", mode="before")(_empty_is_absent)

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)


class ServedFieldsOut(Schema):
    """What an answer about an instant adds: the version served then, and for how long."""

    valid_from: datetime = Field(description="when this version started being served")
    valid_until: datetime | None = Field(
        description="when the next version replaced it; null while current"
    )
    version: int
    seq: int | None = Field(
        description="the JetStream sequence of its `rate.updated`; null if unknown"
    )


class CurrentRateAtOut(CurrentRateOut, ServedFieldsOut):
    pass


class PairRateAtOut(PairRateOut, ServedFieldsOut):
    pass


class ConvertAtOut(ConvertOut):
    """A conversion at an instant; the served fields are null when from = to (rate 1)."""

    valid_from: datetime | None
    valid_until: datetime | None
    version: int | None
    seq: int | None
