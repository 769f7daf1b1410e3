from __future__ import annotations

from datetime import datetime

from ninja import Schema
from pydantic import ConfigDict, Field, StrictBool, StrictStr, field_validator

from items.models import ASSET_CODE_RE, normalise_asset

# No control characters (a NUL byte is refused by PostgreSQL's text type: a 500, not a 422).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class ItemOut(Schema):
    id: int
    code: str
    base: str
    quote: str
    name: str
    is_active: bool
    created_at: datetime
    updated_at: datetime


class ItemIn(Schema):
    model_config = ConfigDict(extra="forbid")

    base: StrictStr = Field(..., examples=["BTC"], description="asset code, 2-12 of A-Z 0-9")
    quote: StrictStr = Field(..., examples=["USD"])
    name: StrictStr = Field("", max_length=100, pattern=PRINTABLE)
    is_active: StrictBool = True

    @field_validator("base", "quote")
    @classmethod
    def _asset_code(cls, value: str) -> str:
        value = normalise_asset(value)
        if not ASSET_CODE_RE.match(value):
            raise ValueError("use 2 to 12 letters A-Z or digits")
        return value


class ItemPatch(Schema):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr | None = Field(None, max_length=100, pattern=PRINTABLE)
    is_active: StrictBool | None = None
