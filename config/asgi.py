"""ASGI entry point: HTTP through Django (`/courses` first through its fast path), WebSocket
through Channels, lifespan to the NATS bridge."""

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
from config.fastpath import CoursesFastPath  # noqa: E402
from rates.courses import courses_cache  # noqa: E402
from rates.snapshot import snapshot  # noqa: E402
from realtime.bridge import lifespan  # noqa: E402
from realtime.origin import BrowserOriginValidator  # noqa: E402
from realtime.routing import websocket_urlpatterns  # noqa: E402

# `GET /api/v1/courses` is answered from the snapshot before Django (config/fastpath.py).
http_app = CoursesFastPath(django_asgi_app, cache=courses_cache, snapshot=snapshot)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        # No Origin (servers, scripts) is accepted; a foreign browser Origin is refused (SPEC 8).
        "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns)),
        # uvicorn (and granian) send lifespan events: the NATS bridge starts with the server.
        "lifespan": lifespan,
    }
)
