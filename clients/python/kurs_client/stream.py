"""The event stream: `/ws/items`, or `/api/v1/stream` (SSE) when the socket cannot be opened,
reconnecting with jittered back-off and resuming by `seq` and the stream's `epoch`
(docs/events.md#resume-without-loss).

Every frame of every connection goes through one `Cursor` (kurs_client/cursor.py), which drops
what is not newer, so the iterator never yields a duplicate or an out-of-order version of a pair.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from kurs_client.cursor import Cursor
from kurs_client.errors import ApiError, RateLimited, ServerError, api_error
from kurs_client.models import Event, loads

log = logging.getLogger("kurs_client")

WEBSOCKET = "websocket"
SSE = "sse"


@dataclass(frozen=True)
class Backoff:
    """Full jitter: before the n-th attempt in a row, a uniform wait in [0, min(maximum,
    initial * 2**n)] seconds, at least the server's `Retry-After` when it gave one."""

    initial: float = 0.25
    maximum: float = 10.0

    def delay(self, attempt: int, floor: float = 0.0) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt, 30))
        return max(floor, random.uniform(0, ceiling))


class Dropped(Exception):
    """The connection ended or stopped answering: reconnect."""


class Connection(Protocol):
    transport: str

    async def receive(self, idle: float) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class SocketConnection:
    transport = WEBSOCKET

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket

    async def receive(self, idle: float) -> dict[str, Any]:
        """The next frame; after `idle` seconds of silence a ping, after twice that: dropped."""
        for attempt in range(2):
            try:
                async with asyncio.timeout(idle):
                    raw = await self.socket.recv()
            except TimeoutError:
                if attempt == 0:
                    await self._send('{"action": "ping"}')
                continue
            except WebSocketException as exc:
                raise Dropped(f"socket closed: {exc}") from exc
            frame = loads(raw)
            if not isinstance(frame, dict):
                raise Dropped(f"not a JSON object: {raw!r:.100}")
            return frame
        raise Dropped(f"nothing from the server in {2 * idle:g}s")

    async def _send(self, text: str) -> None:
        try:
            await self.socket.send(text)
        except WebSocketException as exc:
            raise Dropped(f"socket closed: {exc}") from exc

    async def close(self) -> None:
        await self.socket.close()


class EventSourceConnection:
    """Server-Sent Events: `id`, `event`, `data` lines, a blank line ends an event."""

    transport = SSE

    def __init__(self, client: httpx.AsyncClient, response: httpx.Response) -> None:
        self.client, self.response = client, response
        self.lines = response.aiter_lines()

    async def receive(self, idle: float) -> dict[str, Any]:
        data: list[str] = []
        while True:
            try:
                async with asyncio.timeout(2 * idle):  # keep-alive comments come every heartbeat
                    line = await anext(self.lines)
            except TimeoutError:
                raise Dropped(f"nothing from the server in {2 * idle:g}s") from None
            except (StopAsyncIteration, httpx.HTTPError) as exc:
                raise Dropped(f"stream ended: {exc!r}") from exc
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                frame = loads("\n".join(data))
                if not isinstance(frame, dict):
                    raise Dropped("an event whose data is not a JSON object")
                return frame

    async def close(self) -> None:
        await self.response.aclose()
        await self.client.aclose()


class EventStream:
    """An async iterator of `Event`s that survives disconnections (`AsyncClient.stream`).

    `last_seq` is where it would resume, in the stream of `epoch`; `reconnects` counts the
    connections after the first; `transport` is `websocket` or `sse`; `dropped` counts frames
    refused as not newer.
    """

    def __init__(
        self,
        base_url: str,
        *,
        pairs: Sequence[str] | None = None,
        since: int | None = None,
        epoch: str | None = None,
        options: dict[str, str] | None = None,
        transport: str | None = None,
        backoff: Backoff | None = None,
        idle_timeout: float = 45.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if transport not in (None, WEBSOCKET, SSE):
            raise ValueError(f"transport: {WEBSOCKET!r}, {SSE!r} or None (either)")
        self.base_url = base_url.rstrip("/")
        self.pairs = list(pairs) if pairs is not None else None
        self.options = dict(options or {})
        self.cursor = Cursor(last_seq=since, epoch=epoch)
        self.backoff = backoff or Backoff()
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.reconnects = -1
        self.transport: str | None = None
        self._only = transport
        self._websocket_refused = False
        self._connection: Connection | None = None
        self._closed = False

    @property
    def last_seq(self) -> int | None:
        return self.cursor.last_seq

    @property
    def epoch(self) -> str | None:
        return self.cursor.epoch

    @property
    def dropped(self) -> int:
        return self.cursor.dropped.duplicate_seq + self.cursor.dropped.old_version

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while not self._closed:
            connection = self._connection or await self._connect()
            try:
                frame = await connection.receive(self.idle_timeout)
            except Dropped as exc:
                log.info("kurs stream dropped (%s), reconnecting from seq %s", exc, self.last_seq)
                await self._drop()
                continue
            event = self.cursor.accept(frame)
            if event is not None:
                return event
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception as exc:  # a broken connection may fail to close; it is gone anyway
                log.debug("closing a dropped kurs connection: %r", exc)

    def query(self) -> dict[str, str]:
        query = dict(self.options)
        if self.pairs is not None:
            query["pairs"] = ",".join(self.pairs)
        if self.last_seq is not None:
            query["since"] = str(self.last_seq)
            if self.epoch is not None:
                query["epoch"] = self.epoch
        return query

    async def _connect(self) -> Connection:
        """Connect (the socket, else the stream), waiting between failed attempts."""
        attempt = 0
        while True:
            floor = 0.0
            try:
                connection = await self._open()
            except ApiError as exc:
                if not isinstance(exc, RateLimited | ServerError):
                    raise  # the request itself is wrong (a 422 names what): retrying won't help
                floor = exc.retry_after or 0.0
                log.info("kurs stream refused (%s), retrying", exc)
            except (OSError, TimeoutError, httpx.HTTPError, WebSocketException) as exc:
                log.info("kurs stream cannot connect (%r), retrying", exc)
            else:
                self.cursor.connected()
                self._connection = connection
                self.transport = connection.transport
                self.reconnects += 1
                return connection
            await asyncio.sleep(self.backoff.delay(attempt, floor))
            attempt += 1

    async def _open(self) -> Connection:
        if self._only == SSE or (self._only is None and self._websocket_refused):
            return await self._open_sse()
        try:
            return await self._open_socket()
        except (InvalidStatus, InvalidHandshake) as exc:
            # An HTTP answer that is not an upgrade (a proxy without WebSocket): the stream.
            if self._only == WEBSOCKET:
                raise
            log.info("kurs socket refused (%r): using the event stream", exc)
            status = exc.response.status_code if isinstance(exc, InvalidStatus) else 0
            self._websocket_refused = 400 <= status < 500 and status != 429
            return await self._open_sse()

    async def _open_socket(self) -> Connection:
        scheme, rest = self.base_url.split("://", 1)
        url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws/items?{urlencode(self.query())}"
        socket = await ws_connect(url, open_timeout=self.connect_timeout, max_size=2**22)
        return SocketConnection(socket)

    async def _open_sse(self) -> Connection:
        url = f"{self.base_url}/api/v1/stream"
        headers = {"Accept": "text/event-stream"}
        if self.last_seq is not None:
            headers["Last-Event-ID"] = str(self.last_seq)
        client = httpx.AsyncClient(timeout=httpx.Timeout(self.connect_timeout, read=None))
        try:
            request = client.build_request("GET", url, params=self.query(), headers=headers)
            response = await client.send(request, stream=True)
            if response.status_code != 200:
                content = await response.aread()
                await response.aclose()
                try:
                    body = loads(content)
                except ValueError:
                    body = None
                raise api_error(response.status_code, body, response.headers)
        except BaseException:
            await client.aclose()
            raise
        return EventSourceConnection(client, response)


def stream_options(
    min_interval_ms: int | None, min_change: Decimal | str | None, expand: str | None
) -> dict[str, str]:
    """The subscription's delivery options as query parameters (docs/events.md#delivery-policy)."""
    options = {"min_interval_ms": min_interval_ms, "min_change": min_change, "expand": expand}
    return {key: str(value) for key, value in options.items() if value is not None}
