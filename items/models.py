from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

ASSET_CODE_RE = re.compile(r"^[A-Z0-9]{2,12}$")


def normalise_asset(value: str) -> str:
    """`" btc "` -> `"BTC"`: codes are stored upper-case, without surrounding blanks."""
    return value.strip().upper()


def validate_asset(value: str) -> None:
    if not ASSET_CODE_RE.match(value):
        raise ValidationError(
            "%(value)r is not an asset code: use 2 to 12 letters A-Z or digits",
            params={"value": value},
            code="invalid_asset",
        )


# C0 and C1 control characters and DEL: a NUL is refused by PostgreSQL's text type (a 500, not a
# 422), the others forge log lines and break terminals and CSV exports.
CONTROL_CHARACTERS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def validate_printable(value: str) -> None:
    if CONTROL_CHARACTERS_RE.search(value):
        raise ValidationError("must not contain control characters", code="control_character")


# What an Item is to the outside world (API, events): one list, used by the schema and the events.
ITEM_FIELDS = (
    "id",
    "code",
    "base",
    "quote",
    "name",
    "is_active",
    "pricing",
    "markup_bps",
    "created_at",
    "updated_at",
)

# How an item's rate is priced (docs/rates.md#consensus-pricing); null: KURS_PRICING.
PRICING_CHOICES = [("priority", "priority"), ("consensus", "consensus")]
# A markup of at most 10 % (1000 bp), in hundredths of a basis point.
MAX_MARKUP_BPS = Decimal(1000)


class Item(models.Model):
    """A tracked currency pair, e.g. BTC-USD."""

    base = models.CharField(max_length=12, validators=[validate_asset])
    quote = models.CharField(max_length=12, validators=[validate_asset])
    code = models.CharField(max_length=25, unique=True, editable=False)
    name = models.CharField(max_length=100, blank=True, default="", validators=[validate_printable])
    is_active = models.BooleanField(default=True, db_index=True)
    # Null, not "": the API shows `"pricing": null` for "the default" (KURS_PRICING).
    pricing = models.CharField(  # noqa: DJ001
        max_length=16,
        choices=PRICING_CHOICES,
        null=True,
        blank=True,
        help_text="priority or consensus; empty: the default, KURS_PRICING",
    )
    markup_bps = models.DecimalField(
        max_digits=6,
        decimal_places=2,
        default=Decimal(0),
        validators=[MinValueValidator(Decimal(0)), MaxValueValidator(MAX_MARKUP_BPS)],
        help_text="basis points added to ask (buy) and taken from bid (sell), 0 to 1000",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(base=models.F("quote")), name="item_base_differs_from_quote"
            ),
        ]

    def __str__(self) -> str:
        return self.code

    def save(self, *args: Any, **kwargs: Any) -> None:
        # The code is derived, never typed: keep it in step with base and quote.
        self.code = self.make_code(self.base, self.quote)
        super().save(*args, **kwargs)

    @staticmethod
    def make_code(base: str, quote: str) -> str:
        return f"{base}-{quote}"

    def clean(self) -> None:
        self.base = normalise_asset(self.base or "")
        self.quote = normalise_asset(self.quote or "")
        if self.base and self.base == self.quote:
            raise ValidationError({"quote": "quote must differ from base"})


class ApiKey(models.Model):
    """A key for the write endpoints. Only a SHA-256 hash is stored; the raw key is shown once."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
