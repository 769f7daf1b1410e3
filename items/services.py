"""Writes to items and API keys. Each write owns its side effects: events go out on commit."""

from __future__ import annotations

import enum
import hashlib
import secrets
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from items.exceptions import InvalidItem, ItemAlreadyExists
from items.models import ApiKey, Item, normalise_asset, validate_asset, validate_printable
from items.selectors import item_fields
from realtime import events

API_KEY_PREFIX = "kurs_"


class _Unset(enum.Enum):
    UNSET = "unset"


UNSET = _Unset.UNSET


def item_to_event(item: Item) -> dict[str, Any]:
    return item_fields(item)


def _checked_asset(field: str, value: str) -> str:
    normalised = normalise_asset(value)
    try:
        validate_asset(normalised)
    except ValidationError as exc:
        raise InvalidItem(field, exc.messages[0]) from None
    return normalised


def _checked_name(name: str) -> str:
    try:
        validate_printable(name)
    except ValidationError as exc:
        raise InvalidItem("name", exc.messages[0]) from None
    return name.strip()


@transaction.atomic
def item_create(
    *,
    base: str,
    quote: str,
    name: str = "",
    is_active: bool = True,
    pricing: str | None = None,
    markup_bps: Decimal = Decimal(0),
) -> Item:
    base = _checked_asset("base", base)
    quote = _checked_asset("quote", quote)
    name = _checked_name(name)
    if base == quote:
        raise InvalidItem("quote", "quote must differ from base")
    code = Item.make_code(base, quote)
    if Item.objects.filter(code=code).exists():
        raise ItemAlreadyExists(f"item {code} already exists")
    try:
        # A savepoint, so that losing a race to a concurrent create leaves this transaction usable.
        with transaction.atomic():
            item = Item.objects.create(
                base=base,
                quote=quote,
                name=name,
                is_active=is_active,
                pricing=pricing,
                markup_bps=markup_bps,
            )
    except IntegrityError:
        raise ItemAlreadyExists(f"item {code} already exists") from None
    events.publish_on_commit("item.created", item_to_event(item))
    return item


@transaction.atomic
def item_update(
    *,
    item: Item,
    name: str | None = None,
    is_active: bool | None = None,
    pricing: str | None | _Unset = UNSET,
    markup_bps: Decimal | None = None,
) -> Item:
    """Change what is given (`pricing=None` sets the default pricing; UNSET leaves it)."""
    fields: list[str] = []
    if name is not None:
        name = _checked_name(name)
    if name is not None and name != item.name:
        item.name = name
        fields.append("name")
    if is_active is not None and is_active != item.is_active:
        item.is_active = is_active
        fields.append("is_active")
    if not isinstance(pricing, _Unset) and pricing != item.pricing:
        item.pricing = pricing
        fields.append("pricing")
    if markup_bps is not None and markup_bps != item.markup_bps:
        item.markup_bps = markup_bps
        fields.append("markup_bps")
    if fields:
        item.save(update_fields=[*fields, "updated_at"])
        events.publish_on_commit("item.updated", item_to_event(item))
    return item


@transaction.atomic
def item_delete(*, item: Item) -> None:
    """Delete the item and, by cascade, its rates; an item deleted meanwhile is left deleted.

    The item's row is locked first: the owner's writes of its rates (which lock the item's row
    against deletion while they insert) finish before the cascade collects the rows, or wait for
    the deletion and fail alone. Without the lock, a rate the owner committed between the cascade
    and the commit broke the foreign key at commit: a 500 on DELETE (found by make test-prod).
    """
    if not Item.objects.select_for_update().filter(pk=item.pk).exists():
        return  # deleted by another request meanwhile: nothing to delete or announce
    data = {"id": item.id, "code": item.code}
    item.delete()  # its Rate history goes with it (on_delete=CASCADE)
    events.publish_on_commit("item.deleted", data)


def hash_api_key(raw_key: str) -> str:
    # Keys are 256-bit random tokens, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_create(*, name: str) -> tuple[ApiKey, str]:
    """Create a key and return it with the raw key, which is never stored and shown only once."""
    name = name.strip()
    if not name:
        raise ValueError("an API key needs a name")
    raw_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        name=name, prefix=raw_key[: len(API_KEY_PREFIX) + 4], key_hash=hash_api_key(raw_key)
    )
    return api_key, raw_key


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_key_touch(*, api_key: ApiKey) -> None:
    """Record use at most once a minute, so that busy clients do not write on every request."""
    now = timezone.now()
    if api_key.last_used_at is None or (now - api_key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
