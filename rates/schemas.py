from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from ninja import Schema
from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from items.schemas import RateOut


class RateListOut(Schema):
    items: list[RateOut]
    count: int


class RateListQuery(Schema):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=500)
    since: datetime | None = Field(None, description="received at or after (ISO-8601, UTC)")
    until: datetime | None = Field(None, description="received before (ISO-8601, UTC)")
    date: dt.date | None = Field(None, description="a UTC day, YYYY-MM-DD")
    provider: str | None = Field(None, min_length=1, max_length=32)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        # A time without an offset is read as UTC, the only zone Kurs speaks.
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
            raise ValueError("out of range") from None

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
    errors_5m: int
    streaming: bool


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
    value: Decimal = Field(..., examples=[54000.000123])
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
