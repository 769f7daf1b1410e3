"""Reads of items and API keys."""

from __future__ import annotations

from django.db.models import QuerySet

from items.exceptions import ItemNotFound
from items.models import ITEM_FIELDS, ApiKey, Item


def item_list(*, is_active: bool | None = None) -> QuerySet[Item]:
    items = Item.objects.all()
    if is_active is not None:
        items = items.filter(is_active=is_active)
    return items.order_by("id")


# Ids are BigAutoField: anything larger cannot exist, and would overflow the database type.
_MAX_ID = 2**63 - 1


async def item_get(*, item_id: int) -> Item:
    if not 0 < item_id <= _MAX_ID:
        raise ItemNotFound(f"item {item_id} not found")
    try:
        return await Item.objects.aget(pk=item_id)
    except Item.DoesNotExist:
        raise ItemNotFound(f"item {item_id} not found") from None


async def api_key_get_active(*, key_hash: str) -> ApiKey | None:
    return await ApiKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True).afirst()


def item_fields(item: Item) -> dict[str, object]:
    """The item as the API and the events show it (ITEM_FIELDS)."""
    return {name: getattr(item, name) for name in ITEM_FIELDS}
