"""`Client` (blocking) and `AsyncClient` (asyncio): the REST calls of docs/api.md and the
resuming event stream of docs/events.md. Both send the calls of kurs_client/calls.py; the
blocking stream drives the asyncio one on a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import httpx

from kurs_client import calls, models
from kurs_client.calls import Amount, Call
from kurs_client.errors import TransportError, Unauthorized
from kurs_client.stream import Backoff, EventStream, stream_options

T = TypeVar("T")
P = ParamSpec("P")
DEFAULT_TIMEOUT = 10.0


class _Base:
    """What both clients share: the server, the key, and the stream of the server's events."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.headers = {"Accept": "application/json", "User-Agent": "kurs-client/0.1"}
        if api_key:
            self.headers["X-API-Key"] = api_key

    def _check_key(self, call: Call[Any]) -> None:
        if call.write and not self.api_key:
            raise Unauthorized(401, f"{call.method} {call.path} needs an API key (api_key=...)")

    def _events(
        self,
        pairs: Sequence[str] | None = None,
        *,
        since: int | None = None,
        epoch: str | None = None,
        min_interval_ms: int | None = None,
        min_change: Decimal | str | None = None,
        expand: str | None = None,
        transport: str | None = None,
        backoff: Backoff | None = None,
        idle_timeout: float = 45.0,
    ) -> EventStream:
        """Events of `pairs` (None: every active pair) from now, or after `since` (of the stream
        of `epoch`, as `last_seq` and `epoch` of an earlier stream give them); see
        `EventStream`: `async for` over `AsyncClient.stream`, `for` over `Client.stream`. Close
        it (or use `async with` / `with`) to disconnect."""
        return EventStream(
            self.base_url,
            pairs=pairs,
            since=since,
            epoch=epoch,
            options=stream_options(min_interval_ms, min_change, expand),
            transport=transport,
            backoff=backoff,
            idle_timeout=idle_timeout,
        )


def _blocking(
    events: Callable[Concatenate[_Base, P], EventStream],
) -> Callable[Concatenate[_Base, P], Stream]:
    """`events` with the same parameters, run on a thread of its own as a blocking `Stream`."""

    def stream(client: _Base, /, *args: P.args, **kwargs: P.kwargs) -> Stream:
        return Stream(events(client, *args, **kwargs))

    stream.__doc__ = events.__doc__
    return stream


class Client(_Base):
    """Blocking client: `Client("http://127.0.0.1:8000").rate("BTC", "USD").value`."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(base_url, api_key)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: Call[T]) -> T:
        self._check_key(call)
        try:
            response = self.http.request(call.method, call.path, params=call.params, json=call.body)
        except httpx.HTTPError as exc:
            raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
        return call.answer(response.status_code, response.content, response.headers)

    def items(
        self, *, is_active: bool | None = None, limit: int | None = None, offset: int | None = None
    ) -> models.ItemPage:
        return self.send(calls.items(is_active, limit, offset))

    def item(self, item_id: int) -> models.Item:
        return self.send(calls.item(item_id))

    def create_item(
        self, base: str, quote: str, *, name: str | None = None, is_active: bool | None = None
    ) -> models.Item:
        return self.send(calls.create_item(base, quote, name, is_active))

    def update_item(self, item_id: int, **changes: Any) -> models.Item:
        return self.send(calls.update_item(item_id, changes))

    def delete_item(self, item_id: int) -> None:
        self.send(calls.delete_item(item_id))

    def latest(
        self, item_id: int, *, at: datetime | None = None, expand: str | None = None
    ) -> models.CurrentRate:
        return self.send(calls.latest(item_id, at, expand))

    def history(
        self,
        item_id: int,
        *,
        limit: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        date: str | None = None,
        provider: str | None = None,
    ) -> models.RatePage:
        call = calls.history(
            item_id, limit=limit, since=since, until=until, date=date, provider=provider
        )
        return self.send(call)

    def candles(
        self,
        item_id: int,
        interval: str = "1m",
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[models.Candle]:
        return self.send(calls.candles(item_id, interval, since, until))

    def rate(
        self, base: str, quote: str, *, at: datetime | None = None, expand: str | None = None
    ) -> models.PairRate:
        return self.send(calls.rate(base, quote, at, expand))

    def courses(
        self, directions: Iterable[str] | None = None, *, exchanger: str | None = None
    ) -> models.Courses:
        return self.send(calls.courses(directions, exchanger))

    def convert(
        self,
        from_: str,
        to: str,
        amount: Amount,
        *,
        side: str | None = None,
        at: datetime | None = None,
    ) -> models.Conversion:
        return self.send(calls.convert(from_, to, amount, side, at))

    def providers(self) -> list[models.Provider]:
        return self.send(calls.providers())

    def health(self) -> models.Health:
        return self.send(calls.health())

    def run_fetch(self) -> models.FetchReport:
        return self.send(calls.run_fetch())

    stream = _blocking(_Base._events)


class Stream(Iterator[models.Event]):
    """A blocking iterator over an `EventStream`, run on an event loop in a thread of its own
    (so heartbeats are answered while the caller is busy between events)."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kurs-client-stream", daemon=True
        )
        self._thread.start()

    def _run(self, coroutine: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def __next__(self) -> models.Event:
        if self._loop.is_closed():
            raise StopIteration
        future = self._run(self.stream.__anext__())
        try:
            event: models.Event = future.result()
        except StopAsyncIteration:
            raise StopIteration from None
        except BaseException:  # KeyboardInterrupt included: stop waiting in the loop too
            future.cancel()
            raise
        return event

    def next(self, timeout: float) -> models.Event:
        """The next event within `timeout` seconds, else TimeoutError (the stream stays open)."""
        future = self._run(asyncio.wait_for(self.stream.__anext__(), timeout))
        return future.result()  # type: ignore[no-any-return]  # the future of an Event

    @property
    def last_seq(self) -> int | None:
        return self.stream.last_seq

    @property
    def epoch(self) -> str | None:
        return self.stream.epoch

    @property
    def reconnects(self) -> int:
        return self.stream.reconnects

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.stream.aclose()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same calls, awaited, and `async for` over `stream()`."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        super().__init__(base_url, api_key)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call[T]) -> T:
        self._check_key(call)
        try:
            response = await self.http.request(
                call.method, call.path, params=call.params, json=call.body
            )
        except httpx.HTTPError as exc:
            raise TransportError(f"{call.method} {call.path}: {exc!r}") from exc
        return call.answer(response.status_code, response.content, response.headers)

    async def items(
        self, *, is_active: bool | None = None, limit: int | None = None, offset: int | None = None
    ) -> models.ItemPage:
        return await self.send(calls.items(is_active, limit, offset))

    async def item(self, item_id: int) -> models.Item:
        return await self.send(calls.item(item_id))

    async def create_item(
        self, base: str, quote: str, *, name: str | None = None, is_active: bool | None = None
    ) -> models.Item:
        return await self.send(calls.create_item(base, quote, name, is_active))

    async def update_item(self, item_id: int, **changes: Any) -> models.Item:
        return await self.send(calls.update_item(item_id, changes))

    async def delete_item(self, item_id: int) -> None:
        await self.send(calls.delete_item(item_id))

    async def latest(
        self, item_id: int, *, at: datetime | None = None, expand: str | None = None
    ) -> models.CurrentRate:
        return await self.send(calls.latest(item_id, at, expand))

    async def history(
        self,
        item_id: int,
        *,
        limit: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        date: str | None = None,
        provider: str | None = None,
    ) -> models.RatePage:
        call = calls.history(
            item_id, limit=limit, since=since, until=until, date=date, provider=provider
        )
        return await self.send(call)

    async def candles(
        self,
        item_id: int,
        interval: str = "1m",
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[models.Candle]:
        return await self.send(calls.candles(item_id, interval, since, until))

    async def rate(
        self, base: str, quote: str, *, at: datetime | None = None, expand: str | None = None
    ) -> models.PairRate:
        return await self.send(calls.rate(base, quote, at, expand))

    async def courses(
        self, directions: Iterable[str] | None = None, *, exchanger: str | None = None
    ) -> models.Courses:
        return await self.send(calls.courses(directions, exchanger))

    async def convert(
        self,
        from_: str,
        to: str,
        amount: Amount,
        *,
        side: str | None = None,
        at: datetime | None = None,
    ) -> models.Conversion:
        return await self.send(calls.convert(from_, to, amount, side, at))

    async def providers(self) -> list[models.Provider]:
        return await self.send(calls.providers())

    async def health(self) -> models.Health:
        return await self.send(calls.health())

    async def run_fetch(self) -> models.FetchReport:
        return await self.send(calls.run_fetch())

    stream = _Base._events


__all__ = ["AsyncClient", "Client", "Stream"]
