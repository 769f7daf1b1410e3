"""docs/events.md#who-may-connect: no Origin, an allowed host, a listed origin; else 403."""

from __future__ import annotations

import json

import httpx
import pytest
from channels.testing import WebsocketCommunicator
from django.conf import LazySettings
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from realtime.origin import origin_allowed

pytestmark = pytest.mark.django_db(transaction=True)


async def handshake(origin: str | None) -> bool:
    """Whether the ASGI application accepts a handshake with this Origin (None: no header)."""
    from config.asgi import application

    headers = [] if origin is None else [(b"origin", origin.encode())]
    communicator = WebsocketCommunicator(application, "/ws/items", headers=headers)
    connected, _ = await communicator.connect(timeout=10)
    if connected:
        assert json.loads(await communicator.receive_from(3))["type"] == "snapshot"
        await communicator.disconnect()
    return connected


async def test_a_client_without_origin_is_accepted() -> None:
    # A server, a script or a mobile app: what the seeds' own clients do.
    assert await handshake(None)


async def test_a_browser_page_of_an_allowed_host_is_accepted(settings: LazySettings) -> None:
    settings.ALLOWED_HOSTS = ["kurs.example.com", "localhost"]
    assert await handshake("https://kurs.example.com")
    assert await handshake("http://localhost:8000")


async def test_a_cross_site_page_is_refused(settings: LazySettings) -> None:
    settings.ALLOWED_HOSTS = ["kurs.example.com"]
    settings.KURS_WS_ALLOWED_ORIGINS = ["https://app.example.com"]
    assert not await handshake("https://evil.example")
    assert not await handshake("https://kurs.example.com.evil.example")
    assert not await handshake("null")  # a sandboxed frame or a file:// page


async def test_a_listed_origin_is_accepted_exactly(settings: LazySettings) -> None:
    settings.ALLOWED_HOSTS = ["kurs.example.com"]
    settings.KURS_WS_ALLOWED_ORIGINS = ["https://app.example.com"]
    assert await handshake("https://app.example.com")
    assert not await handshake("http://app.example.com")  # another scheme
    assert not await handshake("https://app.example.com:8443")  # another port


async def test_a_star_allows_any_origin(settings: LazySettings) -> None:
    settings.ALLOWED_HOSTS = ["kurs.example.com"]
    settings.KURS_WS_ALLOWED_ORIGINS = ["*"]
    assert await handshake("https://evil.example")


def test_the_rule_is_one_function(settings: LazySettings) -> None:
    settings.ALLOWED_HOSTS = [".example.com"]
    settings.KURS_WS_ALLOWED_ORIGINS = []
    assert origin_allowed(None)
    assert origin_allowed("https://api.example.com")
    assert not origin_allowed("https://example.org")


async def test_over_real_http_a_foreign_origin_gets_403_and_no_origin_connects(
    asgi_server: int, settings: LazySettings
) -> None:
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
    url = f"ws://127.0.0.1:{asgi_server}/ws/items"
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(url, origin=Origin("https://evil.example"))
    assert refused.value.response.status_code == 403
    async with ws_connect(url) as ws:  # websockets sends no Origin unless told to
        assert json.loads(await ws.recv())["type"] == "snapshot"
    async with ws_connect(url, origin=Origin(f"http://127.0.0.1:{asgi_server}")) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
    # The event stream follows the same rule.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{asgi_server}") as client:
        answer = await client.get("/api/v1/stream", headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403
    assert answer.json() == {"detail": "origin 'https://evil.example' is not allowed"}
