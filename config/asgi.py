"""ASGI entry point: HTTP through Django, WebSocket through Channels."""

from __future__ import annotations

import os
import sys

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
from realtime.bridge import lifespan  # noqa: E402
from realtime.origin import BrowserOriginValidator  # noqa: E402
from realtime.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # No Origin (servers, scripts) is accepted; a foreign browser Origin is refused (SPEC 8).
        "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns)),
        # uvicorn (and granian) send lifespan events: the NATS bridge starts with the server.
        "lifespan": lifespan,
    }
)
