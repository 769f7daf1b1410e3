from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from ninja import Schema
from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from items.schemas import ItemOut


class RateOut(Schema):
    """One history row (SPEC 5 "Rate JSON")."""

    provider: str
    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    source_time: datetime
    received_at: datetime


class RouteLegOut(Schema):
    pair: str
    provider: str
    value: Decimal
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
