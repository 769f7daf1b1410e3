from __future__ import annotations

import re
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Annotated, Literal

from ninja import Schema
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from items.models import ASSET_CODE_RE, MAX_MARKUP_BPS, normalise_asset

# No control characters (items.models.validate_printable; a NUL would be a 500 on PostgreSQL).
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"
# What an asset code may be typed as: ASCII letters and digits, any case, blanks around. Checked
# before normalising, so nothing outside this (`ß`.upper() is `SS`) slips through upper().
ASSET_CODE_INPUT_PATTERN = r"^ *[A-Za-z0-9]{2,12} *$"
ASSET_CODE_INPUT_RE = re.compile(ASSET_CODE_INPUT_PATTERN)


Pricing = Literal["priority", "consensus"]
_MARKUP_STEP = Decimal("0.01")


def _markup_places(value: Decimal) -> Decimal:
    # The column keeps hundredths of a basis point: more places are rounded once, half to even.
    return value.quantize(_MARKUP_STEP, rounding=ROUND_HALF_EVEN)


# A markup in basis points, 0 to 1000 (10 %), kept to 2 decimal places; exact JSON numbers.
MarkupBps = Annotated[
    Decimal,
    Field(ge=0, le=MAX_MARKUP_BPS),
    AfterValidator(_markup_places),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1000}),
]
_PRICING_DOC = "`priority` or `consensus`; null: the default, KURS_PRICING"
_MARKUP_DOC = "bp added to ask for `buy` and taken from bid for `sell` (0 to 1000)"


class ItemOut(Schema):
    id: int
    code: str
    base: str
    quote: str
    name: str
    is_active: bool
    pricing: Pricing | None = Field(description=_PRICING_DOC)
    markup_bps: MarkupBps = Field(description=_MARKUP_DOC)
    created_at: datetime
    updated_at: datetime


class ItemIn(Schema):
    model_config = ConfigDict(extra="forbid")

    base: StrictStr = Field(
        ...,
        examples=["BTC"],
        pattern=ASSET_CODE_INPUT_PATTERN,
        description="asset code, 2-12 of A-Z 0-9 (any case); differs from quote",
    )
    quote: StrictStr = Field(..., examples=["USD"], pattern=ASSET_CODE_INPUT_PATTERN)
    name: StrictStr = Field("", max_length=100, pattern=PRINTABLE)
    is_active: StrictBool = True
    pricing: Pricing | None = Field(None, description=_PRICING_DOC)
    markup_bps: MarkupBps = Field(Decimal(0), description=_MARKUP_DOC)

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
    pricing: Pricing | None = Field(None, description=_PRICING_DOC + " (null sets the default)")
    markup_bps: MarkupBps | None = Field(None, description=_MARKUP_DOC)
