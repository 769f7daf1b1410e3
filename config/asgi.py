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

from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

application = ProtocolTypeRouter({"http": django_asgi_app})
