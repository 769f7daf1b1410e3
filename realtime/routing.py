from __future__ import annotations

from typing import TYPE_CHECKING

from django.urls import path

from realtime.consumers import ItemsConsumer

if TYPE_CHECKING:
    from channels.routing import URLRouter, _ExtendedURLPattern

websocket_urlpatterns: list[_ExtendedURLPattern | URLRouter] = [
    # django-stubs types path() for views only (django-stubs#3354); Channels routes ASGI apps.
    path("ws/items", ItemsConsumer.as_asgi()),  # type: ignore[arg-type,list-item]  # ASGI app
]
