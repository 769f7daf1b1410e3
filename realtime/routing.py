from __future__ import annotations

from django.urls import path

from realtime.consumers import ItemsConsumer

websocket_urlpatterns = [
    path("ws/items", ItemsConsumer.as_asgi()),
]
