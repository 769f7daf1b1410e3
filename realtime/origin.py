"""Who may open `/ws/items` and the event stream (docs/events.md#who-may-connect).

A client that sends no `Origin` header is not a browser page (a server, a script, a mobile app):
it is accepted, since Origin checks protect browsers' users from cross-site pages, and such a
client can send any Origin it likes anyway. A browser's `Origin` must name a host of
`DJANGO_ALLOWED_HOSTS` (any scheme and port, as Django matches Host) or an origin listed in
`KURS_WS_ALLOWED_ORIGINS` (`*` for any); otherwise the handshake is refused with 403.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import ParseResult, urlparse

from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings


def origin_allowed(origin: str | None) -> bool:
    """The one rule, for WebSocket handshakes and HTTP streams alike (`origin`: the raw header)."""
    if origin is None:
        return True
    try:
        parsed = urlparse(origin.strip().lower())
    except ValueError:
        return False
    return _allowed(parsed)


def _allowed(parsed: ParseResult) -> bool:
    # Read at each handshake, not at import: settings may change under tests.
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = ["localhost", "127.0.0.1", "[::1]"]  # Django's own DEBUG default
    patterns = [*hosts, *settings.KURS_WS_ALLOWED_ORIGINS]
    if "*" in patterns:
        return True
    # A host pattern (no scheme) matches any scheme and port; an origin pattern matches exactly.
    return any(_MATCHER.match_allowed_origin(parsed, pattern) for pattern in patterns)


class BrowserOriginValidator(OriginValidator):
    """Channels' OriginValidator with docs/events.md#who-may-connect's rule: no Origin is fine, a
    foreign one is 403."""

    def __init__(self, application: Any) -> None:
        super().__init__(application, [])

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if parsed_origin is None:
            return True
        return _allowed(parsed_origin)


# Channels' matcher (scheme, default ports, `.example.com` sub-domains) without its own list. It
# only matches, never serves a connection: its application is Channels' denier.
_MATCHER = OriginValidator(WebsocketDenier.as_asgi(), [])
