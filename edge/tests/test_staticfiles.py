"""WhiteNoise stays in the event loop for API requests and still serves static files."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Mapping
from importlib.metadata import version
from typing import Any

import pytest
from asgiref.sync import AsyncToSync
from whitenoise.middleware import WhiteNoiseMiddleware

from config.asgi import django_asgi_app
from edge._whitenoise_compat import UNDOCUMENTED, WRITTEN_AGAINST, served_prefix

pytestmark = pytest.mark.django_db


async def get(path: str) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    pending = [{"type": "http.request", "body": b"", "more_body": False}]
    hang = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await hang.wait()
        return {"type": "http.disconnect"}

    sent: list[Mapping[str, Any]] = []

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    await django_asgi_app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_an_api_request_never_hops_back_from_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hops = []
    original = AsyncToSync.__call__

    def counting(self: AsyncToSync[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncToSync, "__call__", counting)
    status, _ = await get("/api/v1/providers")
    assert status == 200
    assert hops == []  # a sync-only middleware would cost one async_to_sync per request


async def test_static_files_are_still_served() -> None:
    status, body = await get("/static/admin/css/base.css")
    assert status == 200
    assert b"{" in body


async def test_a_static_file_is_streamed_without_djangos_sync_iterator_warning() -> None:
    # That warning went to stderr for every static file: a non-JSON line in production logs.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status, body = await get("/static/admin/css/base.css")
    assert status == 200
    assert b"{" in body


async def test_a_path_under_the_static_prefix_that_is_no_file_goes_on_to_django() -> None:
    status, body = await get("/static/no-such-file.css")
    assert status == 404
    assert body  # Django's own answer, not WhiteNoise's empty not-a-file marker


def test_the_installed_whitenoise_is_the_one_the_adapter_was_written_against() -> None:
    assert version("whitenoise") == WRITTEN_AGAINST, (
        f"whitenoise {version('whitenoise')} is installed; edge/_whitenoise_compat.py was"
        f" written against {WRITTEN_AGAINST}: check the names it lists, then bump it"
    )


def test_the_undocumented_names_still_exist_and_give_the_static_prefix() -> None:
    middleware = WhiteNoiseMiddleware(lambda request: None)
    for cls, names in UNDOCUMENTED.items():
        assert isinstance(middleware, cls)
        for name in names:
            assert hasattr(middleware, name), f"{cls.__name__} no longer has {name!r}"
    assert served_prefix(middleware) == "/static/"
