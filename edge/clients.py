"""Who a request comes from: the one rule every per-client limit uses.

The read throttle (`edge.layer`), on-demand pricing's per-client budget (`rates.answers`), the
streams' connection and replay caps (`realtime.limits`) and the admin's sign-in throttle
(`config.admin_throttle`) all count by this address. With `KURS_NUM_PROXIES` = 0 it is the TCP
peer and `X-Forwarded-For` is ignored; with N trusted proxies in front (nginx: 1) it is the
address the outermost of them appended, which a client cannot forge (docs/settings.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.http import HttpRequest


def client_of(peer: str | None, forwarded_for: str | None, num_proxies: int) -> str:
    """The client's address: the TCP peer, or with `num_proxies` proxies in front the
    X-Forwarded-For entry they appended ("" when there is neither)."""
    if num_proxies == 0 or forwarded_for is None:
        return peer or ""
    addresses = forwarded_for.split(",")
    return addresses[-min(num_proxies, len(addresses))].strip()


def client_of_request(request: HttpRequest) -> str:
    """The same for a request Django answers (its META joins repeated headers with ",")."""
    return client_of(
        request.META.get("REMOTE_ADDR"),
        request.META.get("HTTP_X_FORWARDED_FOR"),
        settings.NINJA_NUM_PROXIES or 0,
    )


def client_of_scope(scope: Mapping[str, Any]) -> str:
    """The same for an ASGI scope (HTTP or a WebSocket handshake), repeated headers joined."""
    forwarded: bytes | None = None
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            forwarded = value if forwarded is None else forwarded + b"," + value
    peer = scope.get("client")
    return client_of(
        peer[0] if peer else None,
        None if forwarded is None else forwarded.decode("latin-1"),
        settings.NINJA_NUM_PROXIES or 0,
    )
