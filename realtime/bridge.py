"""The web process's bridge: one NATS subscription -> the rates snapshot and the local hub.

Started by the ASGI lifespan where the server has one (uvicorn; see `config/asgi.py`), and on
first use otherwise (daphne's runserver has no lifespan): `await bridge.ensure_started()`.

Each message is read once per process. A message with a `Kurs-Origin` header was published by
Kurs (this process or another instance: the fetcher, a worker, another replica) and is handled as
a Kurs event. A message without it came from outside Kurs: on `<prefix>.>` or `items.updates`
it is logged and relayed to sockets as `nats.inbound`. Payloads that are not JSON, or are over
64 KiB, are logged and dropped.

The same handling serves the fallback bus: when a producer cannot reach NATS it sends the event
to a channel-layer group that every bridge joins (or, with the in-memory layer, hands it to this
process's bridge directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from decimal import Decimal
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from nats.aio.msg import Msg

from config.jsonenc import dumps
from rates.snapshot import snapshot
from realtime import metrics
from realtime.events import utc_now_iso
from realtime.hub import hub
from realtime.nats import (
    FALLBACK_MESSAGE_TYPE,
    ORIGIN_HEADER,
    SEED_SUBJECT,
    connection,
    control_prefix,
    fallback_group,
)

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024
SUBSCRIBE_TIMEOUT_S = 5.0
# channels-redis forgets group members after a day (group_expiry): join again well before.
GROUP_REFRESH_S = 3600.0
FALLBACK_ORIGIN = "fallback"


def inbound_frame(subject: str, payload: Any) -> str:
    return dumps(
        {
            "type": "nats.inbound",
            "data": {"subject": subject, "payload": payload},
            "ts": utc_now_iso(),
            "id": str(uuid.uuid4()),
        }
    )


def origin_of(headers: dict[str, str] | None) -> str | None:
    """The `Kurs-Origin` header, whatever case another client's library gave it."""
    if not headers:
        return None
    origin = headers.get(ORIGIN_HEADER)
    if origin is None:
        wanted = ORIGIN_HEADER.lower()
        origin = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return origin


class Bridge:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._sub_ids: list[int] = []
        self._listener: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._start_task is not None and self._start_task.done()

    async def ensure_started(self) -> None:
        """Start once per event loop; later callers wait for the same start."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                # Only tests run several loops in one process: forget the previous one's state.
                await self.stop()
            self._loop = loop
            self._start_task = loop.create_task(self._start())
        assert self._start_task is not None
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        prefix = settings.KURS_NATS_PREFIX
        connection.set_local_fallback(self.deliver_threadsafe)
        futures = []
        for subject in (f"{prefix}.>", SEED_SUBJECT):
            sub_id, future = connection.subscribe(subject, self._on_nats_message)
            self._sub_ids.append(sub_id)
            futures.append(asyncio.wrap_future(future))
        try:
            await asyncio.wait_for(asyncio.gather(*futures), SUBSCRIBE_TIMEOUT_S)
        except Exception as exc:
            # Not fatal: the subscriptions are applied again as soon as NATS is reachable.
            logger.warning("bridge: NATS subscriptions not confirmed yet: %s", exc)
        layer = get_channel_layer()
        if layer is not None and not isinstance(layer, InMemoryChannelLayer):
            joined = asyncio.Event()
            self._listener = asyncio.get_running_loop().create_task(self._listen(layer, joined))
            try:
                await asyncio.wait_for(joined.wait(), SUBSCRIBE_TIMEOUT_S)
            except TimeoutError:
                logger.warning("bridge: not in the fallback group yet; still trying")
        try:
            await snapshot.aload()
        except Exception:
            logger.exception("bridge: could not load the rates snapshot; retried on next use")
        logger.info("bridge: started on %s.> and %s", prefix, SEED_SUBJECT)

    async def ensure_snapshot(self) -> None:
        if not snapshot.loaded:
            await snapshot.aload()

    async def stop(self) -> None:
        for sub_id in self._sub_ids:
            connection.unsubscribe(sub_id)
        self._sub_ids.clear()
        connection.set_local_fallback(None)
        for task in (self._listener, self._start_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._listener = None
        self._start_task = None
        self._loop = None

    async def _listen(self, layer: Any, joined: asyncio.Event) -> None:
        """The fallback bus: this process's channel in the group every bridge joins."""
        group = fallback_group()
        channel = await layer.new_channel()
        loop = asyncio.get_running_loop()
        joined_at = -GROUP_REFRESH_S
        try:
            while True:
                try:
                    if loop.time() - joined_at >= GROUP_REFRESH_S:
                        await layer.group_add(group, channel)
                        joined_at = loop.time()
                        joined.set()
                    message = await asyncio.wait_for(layer.receive(channel), GROUP_REFRESH_S)
                except TimeoutError:
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.warning("bridge: fallback bus error: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                if message.get("type") == FALLBACK_MESSAGE_TYPE:
                    self.handle(str(message["subject"]), FALLBACK_ORIGIN, bytes(message["payload"]))
        finally:
            try:
                await layer.group_discard(group, channel)
            except Exception as exc:
                logger.debug("bridge: group_discard failed: %s", exc)

    async def _on_nats_message(self, msg: Msg) -> None:
        # Runs in the NATS thread; the snapshot and the hub belong to the web server's loop.
        self._call_in_loop(msg.subject, origin_of(msg.headers), msg.data)

    def deliver_threadsafe(self, subject: str, payload: bytes) -> None:
        """The in-memory fallback: an event this process could not send over NATS."""
        self._call_in_loop(subject, FALLBACK_ORIGIN, payload)

    def _call_in_loop(self, subject: str, origin: str | None, payload: bytes) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop closed between the check and the call (the process is stopping).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.handle, subject, origin, payload)

    def handle(self, subject: str, origin: str | None, payload: bytes) -> None:
        if subject.startswith(control_prefix(settings.KURS_NATS_PREFIX)):
            return  # a request to the owner (POST /tasks/run), answered by the fetcher
        if len(payload) > MAX_PAYLOAD_BYTES:
            self._drop(subject, f"payload of {len(payload)} bytes is over 64 KiB")
            return
        try:
            text = payload.decode("utf-8")
            message = json.loads(text, parse_float=Decimal)
        except (UnicodeDecodeError, ValueError):
            self._drop(subject, "payload is not JSON")
            return
        if origin is None:
            logger.info("bridge: inbound message on %s (%d bytes)", subject, len(payload))
            metrics.NATS_INBOUND.labels(outcome="relayed").inc()
            hub.publish(inbound_frame(subject, message))
            return
        if not (
            isinstance(message, dict)
            and isinstance(message.get("type"), str)
            and isinstance(message.get("data"), dict)
        ):
            self._drop(subject, "a Kurs message that is not an event envelope")
            return
        event_type, data = message["type"], message["data"]
        if event_type == "rate.updated":
            try:
                course = snapshot.apply_rate(data)
            except ValueError as exc:
                self._drop(subject, str(exc))
                return
            hub.publish_rate(course.direction, text)
            return
        if event_type.startswith("item."):
            snapshot.apply_item(event_type, data)
        hub.publish(text)

    def _drop(self, subject: str, why: str) -> None:
        metrics.NATS_INBOUND.labels(outcome="dropped").inc()
        logger.warning("bridge: dropped a message on %s: %s", subject, why)


bridge = Bridge()


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI lifespan (routed by ProtocolTypeRouter): start the bridge, drain NATS on shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await bridge.ensure_started()
            except Exception as exc:
                logger.exception("bridge: start-up failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await bridge.stop()
            await asyncio.to_thread(connection.shutdown)
            await send({"type": "lifespan.shutdown.complete"})
            return
