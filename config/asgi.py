"""ASGI entry point: HTTP through the edge (`edge.layer`: its route table answers the hottest
reads, Django the rest), WebSocket through Channels, lifespan to the NATS bridge."""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from config.env import ConfigError

try:
    import config.settings  # noqa: F401 - one clear line on a bad value, then exit
except ConfigError as exc:
    print(f"kurs: configuration error: {exc}", file=sys.stderr)
    sys.exit(2)

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

# Imported after Django is set up: the consumers use models and settings.
from edge.layer import EdgeLayer  # noqa: E402
from rates.ondemand import on_demand  # noqa: E402
from realtime.bridge import lifespan as bridge_lifespan  # noqa: E402
from realtime.origin import BrowserOriginValidator  # noqa: E402
from realtime.routing import websocket_urlpatterns  # noqa: E402

http_app = EdgeLayer(django_asgi_app)


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The bridge's lifespan (NATS), and on shutdown the on-demand rates' HTTP clients closed
    first: their pooled connections to the exchanges end cleanly instead of with the loop."""

    async def receive_and_close() -> dict[str, Any]:
        message: dict[str, Any] = await receive()
        if message["type"] == "lifespan.shutdown":
            await on_demand.aclose()
        return message

    await bridge_lifespan(scope, receive_and_close, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        # No Origin (servers, scripts) is accepted; a foreign browser Origin is refused
        # (docs/events.md#who-may-connect).
        "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns)),
        # uvicorn (and granian) send lifespan events: the NATS bridge starts with the server.
        "lifespan": lifespan,
    }
)
