"""`/ws/items`: the push side of docs/events.md#websocket-wsitems. Thin: parse, ask the snapshot,
hand frames to the hub.

Every frame to the client, replies included, goes through this socket's queue in the hub, so the
order is kept and only one task ever writes to the socket.

`?since=<seq>` (with `&epoch=<epoch>`, the stream it was read in) resumes: instead of a
snapshot, the socket's queue first replays the stream after that sequence (`bridge.replay`), then
continues live; a `since` more than KURS_MAX_REPLAY_EVENTS
behind gets `gap` and a snapshot instead (`realtime.resume`). `?min_interval_ms=` and
`?min_change=` set the socket's delivery policy (also in a `subscribe` action).

Over a per-client cap (`realtime.limits`) the handshake is accepted and at once closed, after an
`error` frame, with a code and reason a browser can read (a refused handshake reaches a page as
a bare 1006): 1008 for too many connections (retrying does not help while the client's others
stay open), 1013 for too many resumes replaying at once (retry in a second).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from config.jsonenc import dumps
from edge._uvicorn_compat import direct_write
from rates.snapshot import snapshot
from realtime import metrics, resume
from realtime.bridge import bridge
from realtime.events import utc_now_iso
from realtime.frames import error_frame
from realtime.hub import CLOSE_TRY_AGAIN_LATER, DeliveryPolicy, SocketQueue, hub
from realtime.limits import Lease, client_of_scope
from realtime.options import (
    BadOption,
    delivery_policy,
    pairs_from_values,
    parse_epoch,
    parse_expand,
    parse_since,
)

MAX_CLIENT_MESSAGE_BYTES = 4 * 1024
MAX_PAIRS_PER_MESSAGE = 100
PONG = dumps({"type": "pong"})
# RFC 6455: the client broke a rule of this server (here: its connections per client).
CLOSE_POLICY_VIOLATION = 1008


def last_value(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def unknown_pairs_detail(unknown: list[str]) -> str:
    return f"unknown pair(s): {', '.join(sorted(unknown))}"


class ItemsConsumer(AsyncWebsocketConsumer):
    # Sockets are fed by the hub, not by a channel-layer channel each: no per-socket layer I/O.
    channel_layer_alias = "kurs-no-per-socket-channel"

    queue: SocketQueue | None = None
    _heartbeat: asyncio.TimerHandle | None = None
    _slots: tuple[Lease, ...] = ()

    async def connect(self) -> None:
        await bridge.ensure_started()
        await bridge.ensure_snapshot()
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        requested = pairs_from_values(query.get("pairs"))
        active = snapshot.active_pairs()
        unknown = [] if requested is None else [p for p in requested if p not in active]
        pairs = None if requested is None else {p for p in requested if p in active}
        # A bad option is reported and ignored, like an unknown pair: the socket still opens.
        errors = []
        try:
            since = parse_since(last_value(query, "since"))
            epoch = parse_epoch(last_value(query, "epoch"))
        except BadOption as exc:
            # Not a resume then: the socket starts with a snapshot, never with a guess.
            since, epoch, errors = None, None, [str(exc)]
        policy: DeliveryPolicy | None = None
        try:
            policy = delivery_policy(
                last_value(query, "min_interval_ms"), last_value(query, "min_change")
            )
        except BadOption as exc:
            errors.append(str(exc))
        try:
            expand = parse_expand(last_value(query, "expand"))
        except BadOption as exc:
            expand, errors = False, [*errors, str(exc)]
        start = resume.plan(since, epoch)
        try:
            connection, replay = resume.admit(client_of_scope(self.scope), start)
        except resume.Refused as refused:
            code = CLOSE_TRY_AGAIN_LATER if refused.replays else CLOSE_POLICY_VIOLATION
            await self._refuse(code, refused.detail)
            return
        # Freed by disconnect(), or when this consumer is collected if that never runs.
        self._slots = tuple(s.bind(self) for s in (connection, replay) if s is not None)
        await self.accept()
        # No await from here to hub.add(): no event can slip in before the snapshot (or, on a
        # resume, before the queue starts holding live frames for after the replay).
        queue = SocketQueue(
            self._send_text,
            self._close_slow,
            pairs=pairs,
            policy=policy,
            prelude=None if replay is None else resume.replay(start, lambda: queue.pairs, replay),
            # Under uvicorn, the fan-out writes each event's frame bytes, made once, directly.
            direct=direct_write(self.base_send),
        )
        self.queue = queue
        queue.expand = expand
        for frame in resume.first_frames(start, pairs, expand=expand):
            queue.put(frame)
        if unknown:
            queue.put(error_frame(unknown_pairs_detail(unknown)))
        for detail in errors:
            queue.put(error_frame(detail))
        hub.add(queue)
        queue.start()
        metrics.WS_CONNECTIONS.inc()
        self._schedule_heartbeat()

    async def disconnect(self, code: int) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for slot in self._slots:
            slot.release()
        if self.queue is not None:
            hub.remove(self.queue)
            metrics.WS_CONNECTIONS.dec()
            await self.queue.stop()
            self.queue = None

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.queue is None:
            return
        reply = self.answer(text_data, bytes_data)
        for frame in reply:
            self.queue.put(frame)

    def answer(self, text_data: str | None, bytes_data: bytes | None) -> list[str]:
        """The frames that answer one client message (errors never close the socket)."""
        if text_data is None:
            return [error_frame("binary messages are not supported; send JSON text")]
        if len(text_data.encode("utf-8")) > MAX_CLIENT_MESSAGE_BYTES:
            return [error_frame("message over 4 KiB")]
        if text_data.strip() == "ping":
            return [PONG]
        try:
            message = json.loads(text_data)
        except (ValueError, RecursionError):
            # RecursionError: nesting deeper than the decoder's recursion limit (`[[[[...`
            # fits in 4 KiB), a client's mistake like any other bad JSON.
            return [error_frame("bad JSON")]
        if not isinstance(message, dict):
            return [error_frame("expected a JSON object with an action")]
        action = message.get("action")
        if action == "ping":
            return [PONG]
        if action in ("subscribe", "unsubscribe"):
            return self._change_subscription(action, message)
        return [error_frame(f"unknown action {action!r}: use subscribe, unsubscribe or ping")]

    def _change_subscription(self, action: str, message: dict[str, Any]) -> list[str]:
        assert self.queue is not None
        raw_pairs = message.get("pairs")
        options = action == "subscribe" and (
            "min_interval_ms" in message or "min_change" in message or "expand" in message
        )
        frames = []
        if options:
            try:
                policy = delivery_policy(message.get("min_interval_ms"), message.get("min_change"))
                expand = parse_expand(message.get("expand"))
            except BadOption as exc:
                return [error_frame(str(exc))]
            self.queue.set_policy(policy)
            self.queue.expand = expand
            if raw_pairs is None:
                # Options alone: the subscription's pairs stay; its snapshot acknowledges.
                return [bridge.snapshot_frame(self.queue.pairs, expand=expand)]
        if (
            not isinstance(raw_pairs, list)
            or not raw_pairs
            or len(raw_pairs) > MAX_PAIRS_PER_MESSAGE
            or not all(isinstance(p, str) for p in raw_pairs)
        ):
            return [error_frame(f"pairs: a list of 1 to {MAX_PAIRS_PER_MESSAGE} pair codes")]
        active = snapshot.active_pairs()
        asked = {p.strip().upper() for p in raw_pairs}
        unknown = sorted(asked - active)
        known = asked & active
        if unknown:
            frames.append(error_frame(unknown_pairs_detail(unknown)))
        if not known:
            return frames
        current = self.queue.pairs
        if action == "subscribe":
            new = None if current is None else current | known
        else:
            new = (set(active) if current is None else current) - known
        hub.set_pairs(self.queue, new)
        # The new subscription's snapshot acknowledges the change and fills in added pairs.
        frames.append(bridge.snapshot_frame(new, expand=self.queue.expand))
        return frames

    def _send_text(self, frame: str) -> Coroutine[Any, Any, None]:
        # The server's ASGI send itself, not a coroutine around it: the consumer's send() adds
        # two coroutine layers per frame and socket on the fan-out's hottest line, an `async def`
        # here one more. asgiref's type wants `bytes: None` too (arg-type); Channels' test
        # communicator refuses a message that has both keys, and every server reads the two
        # with `.get()`. asgiref types the send as returning any awaitable (return-value); in
        # uvicorn, daphne and Channels' communicator it is an `async def`, a coroutine.
        message = {"type": "websocket.send", "text": frame}
        return self.base_send(message)  # type: ignore[arg-type,return-value]

    async def _close_slow(self, code: int) -> None:
        await self.close(code=code)

    async def _refuse(self, code: int, detail: str) -> None:
        await self.accept()
        await self.send(text_data=error_frame(detail))
        await self.close(code=code, reason=detail)

    def _schedule_heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.call_later(settings.KURS_WS_HEARTBEAT, self._tick)

    def _tick(self) -> None:
        if self.queue is None:
            return
        self.queue.put(dumps({"type": "tick", "data": {}, "ts": utc_now_iso()}))
        self._schedule_heartbeat()
