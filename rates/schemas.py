from __future__ import annotations

import datetime as dt
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal

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
from items.schemas import ItemOut
from rates.selectors import CandleInterval
from rates.validation import DECIMAL_PLACES, UPPER_BOUND

# Decimals leave as exact JSON numbers (config.jsonenc), not as pydantic's default strings.
JsonDecimal = Annotated[Decimal, WithJsonSchema({"type": "number"})]


class RateOut(Schema):
    """One history row (SPEC 5 "Rate JSON")."""

    provider: str
    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    source_time: datetime
    received_at: datetime


class RouteLegOut(Schema):
    pair: str = Field(description="the pair as its provider quoted it")
    provider: str
    value: JsonDecimal
    source_time: datetime


class CurrentRateOut(Schema):
    """The rate the service stands behind now (SPEC 4 "Current rate", SPEC 5 `latest`)."""

    provider: str = Field(description="the serving provider (`a+b` for a cross rate)")
    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    source_time: datetime = Field(description="the exchange's time of this value")
    checked_at: datetime = Field(description="the last time a source confirmed this value")
    received_at: datetime = Field(description="when Kurs first received this value")
    age_s: float = Field(description="seconds since checked_at")
    status: Literal["live", "failover", "stale"]
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
    since: datetime | None = Field(None, description="received at or after (ISO-8601, UTC)")
    until: datetime | None = Field(None, description="received before (ISO-8601, UTC)")
    date: dt.date | None = Field(None, description="a UTC day, YYYY-MM-DD")
    # A provider name, or a cross rate's `a+b` (an unencoded + arrives as a space).
    provider: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[a-z0-9_+ ]+$")

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


class ProviderOut(Schema):
    name: str
    priority: int
    state: Literal["closed", "open", "half_open"]
    last_success: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    errors_5m: int
    streaming: bool


# --- Errors, as config/api.py shapes them (declared so that OpenAPI documents them) -----------
class ErrorOut(Schema):
    detail: str


class CoursesQueryIn(Schema):
    """The filters of `/courses`; `rates.courses.parse_query` validates and normalises them."""

    direction: list[str] = Field(
        default_factory=list,
        description="a pair, e.g. BTC-USD (repeatable, or comma-separated); none: all active pairs",
        examples=[["BTC-USD", "ETH-RUB"]],
    )
    exchanger: str | None = Field(
        None,
        description="a configured provider: only the courses it serves now",
        examples=["binance"],
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


def _empty_is_absent(value: object) -> object:
    # SPEC 5: `?since=&provider=` means the parameters are absent.
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
    if not ASSET_CODE_RE.match(code):
        raise ValueError("not an asset code: use 2 to 12 letters A-Z or digits")
    return code


AssetCode = Annotated[str, BeforeValidator(_asset_code)]


# --- Candles -----------------------------------------------------------------------------------
class CandleQuery(Schema):
    model_config = ConfigDict(extra="forbid")

    interval: CandleInterval = Field(CandleInterval.M1, description="candle width")
    since: datetime | None = Field(
        None, description="from this time (ISO-8601, UTC), rounded down to a candle start"
    )
    until: datetime | None = Field(None, description="received before this time; default now")
    provider: str | None = Field(
        None,
        min_length=1,
        max_length=32,
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


class PairRateOut(Schema):
    pair: str = Field(examples=["AUD-CAD"])
    value: JsonDecimal
    provider: str = Field(description="a provider, or `a+b` for a cross rate's legs")
    source_time: datetime
    age_s: float
    derived: bool
    stale: bool
    status: Literal["live", "failover", "stale"]
    route: list[RouteLegOut] = Field(description="a derived rate's legs; empty otherwise")


# ASCII digits only: \d and Decimal() would also take other scripts' digits ("١٢" as 12).
_DECIMAL_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_MAX_AMOUNT_TEXT = 64


def _amount(value: object) -> Decimal:
    """An exact Decimal from a string or a JSON number (parsed as Decimal, never as a float)."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError('expected a decimal number, e.g. 0.5 or "0.5"')
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_AMOUNT_TEXT:
            raise ValueError(f"too long (at most {_MAX_AMOUNT_TEXT} characters)")
        if not _DECIMAL_RE.fullmatch(text):
            raise ValueError("expected a decimal number, e.g. 0.5")
        value = Decimal(text)
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount < 0:
        raise ValueError("must not be negative")
    if amount >= UPPER_BOUND:
        raise ValueError("must be less than 10^20")
    try:
        exponent = int(amount.normalize().as_tuple().exponent)
    except InvalidOperation:  # pragma: no cover - finite and bounded above
        raise ValueError("expected a decimal number") from None
    if exponent < -DECIMAL_PLACES:
        raise ValueError(f"at most {DECIMAL_PLACES} decimal places")
    return amount if amount else Decimal(0)


Amount = Annotated[
    Decimal,
    BeforeValidator(_amount),
    Field(
        examples=["0.5"],
        description="a decimal, 0 <= amount < 10^20, at most 18 decimal places; a string or a "
        "JSON number (read exactly, never through a float)",
    ),
]


class ConvertIn(Schema):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: AssetCode = Field(alias="from", examples=["BTC"])
    to: AssetCode = Field(examples=["RUB"])
    amount: Amount


class ConvertOut(Schema):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    amount: JsonDecimal
    rate: JsonDecimal = Field(description="1 unit of `from` in `to`")
    result: JsonDecimal = Field(description="amount × rate, rounded half-even to 18 decimal places")
    provider: str | None = Field(description="null when from = to (rate 1)")
    source_time: datetime | None
    age_s: float | None
    derived: bool
    stale: bool
    status: Literal["live", "failover", "stale"]
    route: list[RouteLegOut] = Field(description="a derived rate's legs; empty otherwise")
