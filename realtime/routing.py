from __future__ import annotations

from typing import TYPE_CHECKING

from django.urls import path

from realtime.consumers import ItemsConsumer

if TYPE_CHECKING:
    from channels.consumer import AsyncConsumer
    from channels.routing import URLRouter, _ExtendedURLPattern


def consumer_path(route: str, consumer: type[AsyncConsumer]) -> _ExtendedURLPattern:
    """`path()` for a Channels consumer, typed as Channels' URLRouter takes it: django-stubs
    types `path()` for Django views only (typeddjango/django-stubs#3354)."""
    return path(route, consumer.as_asgi())  # type: ignore[arg-type,return-value]  # ASGI app


websocket_urlpatterns: list[_ExtendedURLPattern | URLRouter] = [
    consumer_path("ws/items", ItemsConsumer),
]
