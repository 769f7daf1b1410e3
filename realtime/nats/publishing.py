"""Publishing: the outbox that `realtime.events.publish` fills, and the fallback bus.

`publish()` only appends to an in-memory outbox and wakes the connection's loop, so a caller in
any thread, sync or async, never waits for the network. The loop's pump sends the outbox on
NATS while connected; when the connection is down, each event goes to the fallback bus instead:
a channel-layer group that every web process's bridge listens on (channels-redis), or, with the
in-memory layer (one process, no Redis), straight to this process's bridge. Events published
during an outage are not replayed on NATS later: the database keeps the truth, NATS is a live
feed (at most once).

Where the server has JetStream, a plain publish on an event subject is also stored in the stream
(the stream captures its subjects): nothing here knows about it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from channels.layers import InMemoryChannelLayer, channel_layers
from django.conf import settings

from config.jsonenc import dumps
from realtime import metrics
from realtime.nats.link import NatsConnection, Part, connection
from realtime.nats.subjects import FALLBACK_MESSAGE_TYPE, ORIGIN_HEADER, fallback_group

logger = logging.getLogger("realtime.nats")

# Bounded memory when both NATS and the fallback stall: the oldest events are dropped first.
OUTBOX_LIMIT = 10_000
# While the first connection is being made, events wait this long for it before they take the
# fallback bus: a one-shot command or a fresh worker publishes right after start-up, and its
# in-memory fallback would reach no one.
FIRST_CONNECT_GRACE_S = 2.0


class Outbox(Part):
    """Queued events and the pump that sends them, over NATS or the fallback bus."""

    def __init__(self, link: NatsConnection) -> None:
        self._link = link
        self._queue: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._wakeup_pending = False
        self._wake: asyncio.Event | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._local_fallback: Callable[[str, bytes], None] | None = None
        self._layer: Any = None
        self._counts = {"nats": 0, "fallback": 0, "dropped": 0}
        link.add_part(self)

    def publish(self, subject: str, payload: bytes, event_id: str | None = None) -> None:
        """Queue one message; never blocks on the network, callable from any thread."""
        self._link.start()
        headers = {ORIGIN_HEADER: settings.KURS_INSTANCE}
        if event_id:
            # JetStream drops a duplicate of the same id inside its window.
            headers["Nats-Msg-Id"] = event_id
        if len(self._queue) >= OUTBOX_LIMIT:
            self._queue.popleft()
            self._counts["dropped"] += 1
            logger.warning("nats: outbox full (%d), dropped the oldest event", OUTBOX_LIMIT)
        self._queue.append((subject, payload, headers))
        # The flag is cleared by the pump before it drains, and set here after the append: a
        # wake-up is never lost, and a burst of publishes costs one self-pipe write.
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._link.call_soon(self._kick)

    def set_local_fallback(self, deliver: Callable[[str, bytes], None] | None) -> None:
        """Where fallback events go with the in-memory channel layer (this process's bridge)."""
        self._local_fallback = deliver

    # --- the connection's lifecycle ----------------------------------------------------------
    def loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._counts = dict.fromkeys(self._counts, 0)
        self._wake = asyncio.Event()
        self._pump_task = loop.create_task(self._pump())

    def ready(self) -> None:
        self._kick()

    async def closing(self) -> None:
        await self._flush()
        if self._pump_task is not None:
            self._pump_task.cancel()

    async def closed(self) -> None:
        if self._layer is not None and hasattr(self._layer, "close_pools"):
            await self._layer.close_pools()
        self._layer = None
        logger.info(
            "nats: closed (published %d, fallback %d, dropped %d, errors %d)",
            self._counts["nats"],
            self._counts["fallback"],
            self._counts["dropped"],
            self._link.errors,
        )

    def forget_after_fork(self) -> None:
        self._queue.clear()
        self._wakeup_pending = False

    def status(self) -> dict[str, Any]:
        return {
            "published": self._counts["nats"],
            "fallback": self._counts["fallback"],
            "dropped": self._counts["dropped"],
            "outbox": len(self._queue),
        }

    # --- the pump ------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _pump(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        self._wakeup_pending = False
        await self._link.wait_first_attempt(FIRST_CONNECT_GRACE_S)
        queue = self._queue
        while queue:
            subject, payload, headers = queue.popleft()
            client = self._link.client
            if client is not None and client.is_connected:
                try:
                    await client.publish(subject, payload, headers=headers)
                    self._counts["nats"] += 1
                    metrics.NATS_PUBLISHES.labels(path="nats").inc()
                    continue
                except Exception as exc:
                    self._link.note_error(f"publish on {subject} failed: {exc}")
            await self._publish_fallback(subject, payload)

    async def _publish_fallback(self, subject: str, payload: bytes) -> None:
        # Counted before the hand-over: the event may reach a socket before this line resumes.
        self._counts["fallback"] += 1
        metrics.NATS_PUBLISHES.labels(path="fallback").inc()
        try:
            layer = self._fallback_layer()
            if isinstance(layer, InMemoryChannelLayer) or layer is None:
                if self._local_fallback is not None:
                    self._local_fallback(subject, payload)
            else:
                await layer.group_send(
                    fallback_group(),
                    {"type": FALLBACK_MESSAGE_TYPE, "subject": subject, "payload": payload},
                )
        except Exception as exc:
            self._counts["dropped"] += 1
            self._link.note_error(f"fallback for {subject} failed, event dropped: {exc}")

    def _fallback_layer(self) -> Any:
        # A layer instance of its own: channels-redis pools belong to the loop that made them.
        if self._layer is None and "default" in channel_layers.configs:
            self._layer = channel_layers.make_backend("default")
        return self._layer


outbox = Outbox(connection)


def transport(subject: str, envelope: dict[str, Any]) -> None:
    """The `realtime.events` transport: serialise in the caller's thread, queue, return."""
    outbox.publish(subject, dumps(envelope).encode(), envelope.get("id"))
