from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime
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
    def _aware(cls, value: datetime | None) -> datetime | None:
        # A time without an offset is read as UTC, the only zone Kurs speaks.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
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
