"""`GET /api/v1/stream`: the events of `/ws/items` as Server-Sent Events
(docs/events.md#server-sent-events-apiv1stream).

A django-ninja operation (so it is in the OpenAPI document, throttled and its errors are JSON
like every other read endpoint) that answers a `StreamingHttpResponse` over an async generator.
Under ASGI Django sends each chunk as it is yielded, and when the client goes away it cancels the
generator, whose `finally` takes the subscription out of the hub: nothing leaks. The choice over
a raw ASGI app mounted in `config/asgi.py`: one route table, one error shape, one throttle.

Each client is a `SocketQueue` of the hub like a WebSocket, with the same pairs, options,
coalescing and slow-client rule; its frames become events `id: <seq>`, `event: <type>`,
`data: <envelope>`. A `: keep-alive` comment goes every `KURS_WS_HEARTBEAT` seconds, so proxies
keep the connection and a client notices a dead one. `Last-Event-ID` (what `EventSource` sends
when it reconnects) or `?since=` resumes from the stream, in the stream of `?epoch=` when given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any, Literal

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import Query, Router, Schema
from ninja.errors import HttpError
from pydantic import ConfigDict, Field, field_validator

from rates.snapshot import snapshot
from realtime import metrics, resume, stream_openapi
from realtime.bridge import bridge
from realtime.hub import DeliveryPolicy, SocketQueue, hub
from realtime.limits import Lease, client_of_request
from realtime.options import BadOption, delivery_policy, pairs_from_values, parse_since
from realtime.origin import origin_allowed
from realtime.stream_openapi import EPOCH_PATTERN

router = Router(tags=["stream"])

# Events waiting between the hub's sender task and the response body.
BUFFER = 64
# EventSource waits this long before it reconnects (with Last-Event-ID) after a drop.
RETRY_MS = 1000
KEEP_ALIVE = b": keep-alive\n\n"

DESCRIPTION = """\
Server-Sent Events (`text/event-stream`): the same events and options as the WebSocket
`/ws/items`. Each event is `id: <seq>` (the JetStream stream sequence, when the server has
JetStream), `event: <type>` and `data: <envelope>` (the JSON envelope, `seq` included). The first
event is the `snapshot` of the subscribed pairs; then every event of the subscription, live; a
`: keep-alive` comment every `KURS_WS_HEARTBEAT` seconds.

Resume: send `Last-Event-ID: <seq>` (browsers' `EventSource` does this by itself on reconnect)
or `?since=<seq>`, and `?epoch=<epoch>` (the `epoch` of the last `snapshot` or `gap`: the stream
that sequence belongs to): the events after that sequence are replayed from the stream, in
order, then the stream continues live. When the stream no longer holds them, or they are more
than `KURS_MAX_REPLAY_EVENTS` (1,000) behind the stream's end, or the stream was made anew since
(`epoch` differs), a `gap` event (`{"since", "first_available"}`, with the stream's `epoch`) and a
fresh `snapshot` come first. Without `epoch`, `since` is taken as a sequence of the current
stream.

Per client address and server process: at most `KURS_MAX_CONNECTIONS_PER_CLIENT` (50) open
streams and WebSockets together, and `KURS_MAX_REPLAYS_PER_CLIENT` (2) resumes replaying at once;
over either, 429 with `Retry-After` and a JSON `detail`.

Follow it with `curl -N 'http://127.0.0.1:8000/api/v1/stream?pairs=BTC-USD'`.
"""


class StreamQuery(Schema):
    model_config = ConfigDict(extra="forbid")

    pairs: str | None = Field(
        None, description="comma-separated pair codes; all active pairs when absent"
    )
    since: int | None = Field(None, ge=0, description="resume after this stream sequence")
    epoch: str | None = Field(
        None,
        pattern=EPOCH_PATTERN,
        description="the stream `since` (or `Last-Event-ID`) was read in: the `epoch` of the "
        "last snapshot or gap; another stream's gets a `gap` and a snapshot",
    )
    min_interval_ms: int | None = Field(
        None, ge=0, le=3_600_000, description="at most one rate update per pair per N ms"
    )
    min_change: float | None = Field(
        None,
        ge=0,
        le=1,
        description="a rate update only when the value moved by this fraction (or status, "
        "provider changed, or a heartbeat is due)",
    )

    expand: Literal["sources"] | None = Field(
        None, description="`sources`: rate payloads list the sources they considered"
    )

    @field_validator(
        "pairs", "since", "epoch", "min_interval_ms", "min_change", "expand", mode="before"
    )
    @classmethod
    def _empty_is_absent(cls, value: Any) -> Any:
        # docs/api.md#query-parameters: `?since=&pairs=` mean absent.
        return None if value == "" else value


@lru_cache(maxsize=4096)
def sse_event(frame: str) -> bytes:
    """One frame as an SSE event. Cached: the hub gives every client the same string object."""
    message = json.loads(frame)
    head = ""
    seq = message.get("seq")
    if isinstance(seq, int):
        head = f"id: {seq}\n"
    kind = message.get("type") if isinstance(message.get("type"), str) else "message"
    # A line break would end the data field early: each line gets its own `data:`.
    data = frame.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\ndata: ")
    return f"{head}event: {kind}\ndata: {data}\n\n".encode()


class _Client:
    """The hub's view of one SSE response: encoded events wait in a short list the body takes
    whole, so a burst leaves as one chunk (one ASGI send, one socket write) rather than one per
    event, and the body waits on an Event, not on a timeout task per event."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.ended = False

    async def send(self, frame: str) -> None:
        # Full: the body is blocked on a client that does not read; the hub's sender waits
        # here, so the hub sees a blocked send (the client is behind: coalescing, then 1013).
        while len(self.pending) >= BUFFER:
            self.room.clear()
            await self.room.wait()
        self.pending.append(sse_event(frame))
        self.ready.set()

    def keep_alive(self) -> None:
        self.pending.append(KEEP_ALIVE)
        self.ready.set()

    async def close(self, code: int) -> None:
        # Kicked as too slow: drop what waits and end the body; the client resumes by seq.
        self.pending.clear()
        self.ended = True
        self.ready.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            await self.ready.wait()
            self.ready.clear()
            if self.ended:
                return
            chunk = b"".join(self.pending)
            self.pending.clear()
            self.room.set()
            yield chunk


async def _body(
    pairs: set[str] | None,
    start: resume.Start,
    policy: DeliveryPolicy | None,
    connection: Lease,
    replay: Lease | None,
    expand: bool = False,
) -> AsyncIterator[bytes]:
    client = _Client()
    queue = SocketQueue(
        client.send,
        client.close,
        pairs=pairs,
        policy=policy,
        prelude=None if replay is None else resume.replay(start, lambda: queue.pairs, replay),
    )
    queue.expand = expand
    # As for a WebSocket: no await between the snapshot and hub.add(), so nothing slips by.
    for frame in resume.first_frames(start, pairs, expand=expand):
        queue.put(frame)
    hub.add(queue)
    queue.start()
    metrics.SSE_CONNECTIONS.inc()
    loop = asyncio.get_running_loop()
    heartbeat = settings.KURS_WS_HEARTBEAT
    beat: asyncio.TimerHandle

    def keep_alive() -> None:
        nonlocal beat
        client.keep_alive()
        beat = loop.call_later(heartbeat, keep_alive)

    beat = loop.call_later(heartbeat, keep_alive)
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        async for chunk in client.chunks():
            yield chunk
    finally:
        # The client went away (Django cancels the body) or was too slow: free the subscription.
        beat.cancel()
        hub.remove(queue)
        metrics.SSE_CONNECTIONS.dec()
        connection.release()
        if replay is not None:
            replay.release()
        with contextlib.suppress(Exception):
            await queue.stop()


@router.get(
    "",
    summary="Live events as Server-Sent Events (text/event-stream)",
    description=DESCRIPTION,
    openapi_extra={
        "parameters": [
            {
                "in": "header",
                "name": "Last-Event-ID",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "resume after this stream sequence (wins over `since`)",
            }
        ],
        "responses": stream_openapi.RESPONSES,
    },
)
async def stream(
    request: HttpRequest, query: Query[StreamQuery]
) -> HttpResponse | StreamingHttpResponse:
    origin = request.headers.get("Origin")
    if not origin_allowed(origin):
        raise HttpError(403, f"origin {origin!r} is not allowed")
    try:
        since = parse_since(request.headers.get("Last-Event-ID") or query.since)
    except BadOption:
        raise HttpError(
            422, "Last-Event-ID: expected a stream sequence (a whole number >= 0)"
        ) from None
    try:
        policy = delivery_policy(query.min_interval_ms, query.min_change)
    except BadOption as exc:
        raise HttpError(422, str(exc)) from None
    await bridge.ensure_started()
    await bridge.ensure_snapshot()
    requested = pairs_from_values([query.pairs] if query.pairs else None)
    pairs = None
    if requested is not None:
        unknown = sorted(set(requested) - snapshot.active_pairs())
        if unknown:
            raise HttpError(422, f"pairs: unknown pair(s): {', '.join(unknown)}")
        pairs = set(requested)
    start = resume.plan(since, query.epoch)
    try:
        connection, replay = resume.admit(client_of_request(request), start)
    except resume.Refused as refused:
        refusal = JsonResponse({"detail": refused.detail}, status=429)
        refusal["Retry-After"] = str(refused.retry_after)
        return refusal
    body = _body(pairs, start, policy, connection, replay, query.expand is not None)
    # A body Django never starts (the client left before the first byte) runs no `finally`:
    # its slots are then freed when it is collected.
    connection.bind(body)
    if replay is not None:
        replay.bind(body)
    response = StreamingHttpResponse(body, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    # nginx (and similar proxies) pass each event on at once instead of buffering the body.
    response["X-Accel-Buffering"] = "no"
    if origin is not None:
        response["Access-Control-Allow-Origin"] = origin
        response["Vary"] = "Origin"
    return response
