"""Items endpoints: parse, call a service or selector, shape the answer."""

# No `from __future__ import annotations` here: ninja's @paginate wraps the view and resolves
# its annotations in ninja's own module, where string annotations (Query[...]) cannot be found.

from asgiref.sync import sync_to_async
from django.db.models import QuerySet
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from ninja import Query, Router, Schema
from ninja.pagination import paginate
from ninja.responses import Status

from edge.answer import to_response
from edge.pagination import BoundedLimitOffset
from edge.security import write_auth
from items import selectors, services
from items.models import Item
from items.schemas import ItemIn, ItemOut, ItemPatch
from rates.detail import item_details
from rates.schemas import ExpandQuery, ItemDetailOut, errors

router = Router(tags=["items"])


class ItemListQuery(Schema):
    is_active: bool | None = None


@router.get("", response={200: list[ItemOut], **errors(422, 429)})
@paginate(BoundedLimitOffset)
async def list_items(request: HttpRequest, filters: Query[ItemListQuery]) -> QuerySet[Item]:
    return selectors.item_list(is_active=filters.is_active)


@router.get("/{int:item_id}", response={200: ItemDetailOut, **errors(404, 422, 429)})
async def get_item(
    request: HttpRequest, item_id: int, query: Query[ExpandQuery]
) -> HttpResponseBase:
    # The edge's route table answers from the cache; this entrance reads the database.
    answer = await item_details.answer(item_id, fresh=True, expand=query.expand is not None)
    return to_response(answer)


@router.post("", response={201: ItemOut, **errors(400, 401, 409, 422)}, auth=write_auth)
async def create_item(request: HttpRequest, payload: ItemIn) -> Status[Item]:
    item = await sync_to_async(services.item_create)(
        base=payload.base,
        quote=payload.quote,
        name=payload.name,
        is_active=payload.is_active,
        pricing=payload.pricing,
        markup_bps=payload.markup_bps,
    )
    return Status(201, item)


@router.patch(
    "/{int:item_id}", response={200: ItemOut, **errors(400, 401, 404, 422)}, auth=write_auth
)
async def patch_item(request: HttpRequest, item_id: int, payload: ItemPatch) -> Item:
    item = await selectors.item_get(item_id=item_id)
    return await sync_to_async(services.item_update)(
        item=item, **payload.model_dump(exclude_unset=True)
    )


@router.delete("/{int:item_id}", response={204: None, **errors(401, 404)}, auth=write_auth)
async def delete_item(request: HttpRequest, item_id: int) -> Status[None]:
    item = await selectors.item_get(item_id=item_id)
    await sync_to_async(services.item_delete)(item=item)
    return Status(204, None)
