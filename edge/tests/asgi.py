"""Requests through the project's HTTP app (`config.asgi.http_app`: the edge, its route table,
Django) as a server hands them over, and the answers as the client sees them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from config.asgi import http_app
from edge.answer import Message

HOST = b"127.0.0.1:8000"


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as the client sees it: the body is every body message's bytes."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes | str) -> bytes | None:
        name = name.encode() if isinstance(name, str) else name
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body, parse_float=Decimal)

    def comparable(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers but the request id (in any order, names in lower case), body."""
        headers = sorted((k.lower(), v) for k, v in self.headers if k.lower() != b"x-request-id")
        return self.status, headers, self.body


async def call(
    path: str,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: str = "GET",
    host: bytes | None = HOST,
    scheme: str = "http",
    body: bytes = b"",
    client: str = "127.0.0.1",
) -> Answer:
    """One request through the project's HTTP app."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [*([(b"host", host)] if host is not None else []), *(headers or [])],
        "client": (client, 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    hang = asyncio.Event()  # after the body, a client that stays connected

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await hang.wait()
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await http_app(scope, receive, send)
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert not bodies[-1].get("more_body", False)
    return Answer(
        start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in bodies)
    )


async def both(
    path: str, query: bytes = b"", headers: Any = None, **kw: Any
) -> tuple[Answer, Answer]:
    """The same request through the route table and through Django (the table switched off)."""
    http_app.fast = True
    fast = await call(path, query, headers, **kw)
    http_app.fast = False
    try:
        slow = await call(path, query, headers, **kw)
    finally:
        http_app.fast = True
    return fast, slow


class DjangoCalls:
    def __init__(self) -> None:
        self.count = 0


@contextmanager
def counting(django_app: Any = None) -> Iterator[DjangoCalls]:
    """`django_app` (Django's, by default) behind the edge, counting the requests it gets."""
    calls = DjangoCalls()
    previous = http_app.app
    inner = django_app or previous

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        calls.count += 1
        await inner(scope, receive, send)

    http_app.app = counted
    try:
        yield calls
    finally:
        http_app.app = previous


@contextmanager
def reloaded() -> Iterator[None]:
    """The edge reads the settings again now and once more when the block ends (tests that
    change a setting it reads, inside pytest-django's `settings` fixture)."""
    http_app.reload()
    try:
        yield
    finally:
        http_app.reload()
