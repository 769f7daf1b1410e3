"""The web process's bridge: one NATS consumer -> the rates snapshot and the local hub.

Started by the ASGI lifespan where the server has one (uvicorn; see `config/asgi.py`), and on
first use otherwise (daphne's runserver has no lifespan): `await bridge.ensure_started()`.

Each message is read once per process. A message with a `Kurs-Origin` header was published by
Kurs (this process or another instance: the fetcher, a worker, another replica) and is handled as
a Kurs event. A message without it came from outside Kurs: on `<prefix>.>` or `items.updates`
it is logged and relayed to sockets as `nats.inbound`. Payloads that are not JSON, or are over
64 KiB, are logged and dropped.

Where the server has JetStream, the events under `<prefix>` are read through one ordered consumer
of the stream (see `realtime.nats.stream.StreamConsumer`), so each comes with its stream
sequence: the bridge adds it to the frame as `seq`, drops a sequence it already handled (a
consumer re-made after a reconnection may repeat a few), and remembers the last one (`last_seq`,
the position a snapshot reflects, with `epoch`, the stream's incarnation). `replay()` reads the
stream after a client's `since` for its resume.

The same handling serves the fallback bus: when a producer cannot reach NATS it sends the event
to a channel-layer group that every bridge joins (or, with the in-memory layer, hands it to this
process's bridge directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from nats.aio.msg import Msg

from config.jsonenc import dumps
from rates.snapshot import snapshot
from realtime import metrics
from realtime.frames import gap_frame, inbound_frame, snapshot_frame, with_seq
from realtime.hub import RateFacts, hub
from realtime.nats import (
    FALLBACK_MESSAGE_TYPE,
    ORIGIN_HEADER,
    REPLAY_WAIT_S,
    SEED_SUBJECT,
    StreamCursor,
    StreamUnavailable,
    connection,
    control_prefix,
    fallback_group,
    outbox,
    stream_consumer,
)

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024
SUBSCRIBE_TIMEOUT_S = 5.0
# channels-redis forgets group members after a day (group_expiry): join again well before.
GROUP_REFRESH_S = 3600.0
FALLBACK_ORIGIN = "fallback"
# Young-generation collections every so many net allocations (CPython's default: 700). The
# fan-out allocates and frees coroutines and futures by the thousand per event, nearly all
# freed by reference counting; collecting less often means fewer and rarer full collections.
GC_THRESHOLD_0 = 20_000


@dataclass(frozen=True, slots=True)
class Event:
    """One message as the hub sees it: its frame, its pair (rate events) and its sequence."""

    frame: str
    kind: str
    data: dict[str, Any] | None
    pair: str | None = None
    seq: int | None = None
    rate: RateFacts | None = None
    # A rate event's frame without `sources` (docs/events.md#expand), when it had them.
    lean: str | None = None


class Dropped(ValueError):
    """A message Kurs does not relay (too big, not JSON, a Kurs message that is no envelope)."""


def decode(subject: str, origin: str | None, payload: bytes, seq: int | None) -> Event:
    """A NATS message as an Event, without side effects; Dropped says why it is not one."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Dropped(f"payload of {len(payload)} bytes is over 64 KiB")
    try:
        text = payload.decode("utf-8")
        message = json.loads(text, parse_float=Decimal)
    except (UnicodeDecodeError, ValueError):
        raise Dropped("payload is not JSON") from None
    if origin is None:
        return Event(inbound_frame(subject, message, seq), "nats.inbound", None, seq=seq)
    if not (
        isinstance(message, dict)
        and isinstance(message.get("type"), str)
        and isinstance(message.get("data"), dict)
    ):
        raise Dropped("a Kurs message that is not an event envelope")
    event_type, data = message["type"], message["data"]
    frame = with_seq(text, message, seq)
    if event_type == "rate.updated":
        pair = data.get("direction")
        if not isinstance(pair, str):
            raise Dropped("malformed rate.updated data: no direction")
        # `status` is absent from producers older than the field list of docs/events.md: None then.
        facts = (data.get("value"), data.get("provider"), data.get("status"))
        lean = None
        if "sources" in data:
            bare = {**message, "data": {k: v for k, v in data.items() if k != "sources"}}
            lean = with_seq(dumps(bare), bare, seq)
        return Event(frame, event_type, data, pair=pair, seq=seq, rate=facts, lean=lean)
    return Event(frame, event_type, data, seq=seq)


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
        # The last stream sequence handed to the hub (the loop's) and received (NATS thread's).
        self.last_seq: int | None = None
        # The epoch of the stream `last_seq` is a sequence of (docs/events.md#resume-without-loss).
        self.epoch: str | None = None
        self._received: int | None = None
        # Set (on the loop) once the ordered consumer has started: from then on every event
        # after `_received` reaches the hub, in order; before, a replay cannot end (see replay).
        self._live: asyncio.Event | None = None
        self._live_start: int | None = None

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
            self._live = asyncio.Event()
            self._start_task = loop.create_task(self._start())
        assert self._start_task is not None
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        prefix = settings.KURS_NATS_PREFIX
        outbox.set_local_fallback(self.deliver_threadsafe)
        # The seeds' subject is outside the stream: a plain subscription, its frames have no seq.
        sub_id, future = connection.subscribe(SEED_SUBJECT, self._on_nats_message)
        self._sub_ids.append(sub_id)
        consumed = stream_consumer.consume(
            f"{prefix}.>",
            self._on_stream_message,
            position=lambda: self._received,
            on_start=self._on_stream_start,
        )
        futures = [asyncio.wrap_future(future), asyncio.wrap_future(consumed)]
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
        stream_consumer.stop_consuming()
        self.last_seq = None
        self.epoch = None
        self._received = None
        self._live = None
        self._live_start = None
        outbox.set_local_fallback(None)
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
        joined_at = -math.inf  # never joined (loop.time()'s origin is undefined)
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

    async def _on_stream_message(self, msg: Msg, seq: int | None) -> None:
        # In the NATS thread, in stream order: a re-made consumer may repeat what came before.
        if seq is not None:
            if self._received is not None and seq <= self._received:
                return
            self._received = seq
        stored_at = msg.metadata.timestamp.timestamp() if seq is not None else None
        self._call_in_loop(msg.subject, origin_of(msg.headers), msg.data, seq, stored_at)

    def _on_stream_start(self, seq: int, epoch: str | None) -> None:
        """The consumer starts after `seq` of the stream of `epoch`: the position a snapshot
        reflects from now on (set, not advanced: a stream made anew starts its numbers again)."""
        self._received = seq
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                # Queued behind the frames of the old stream and ahead of the new one's: the
                # epoch changes on the loop exactly where its numbers do.
                loop.call_soon_threadsafe(self._live_from, seq, epoch)

    def _live_from(self, seq: int, epoch: str | None) -> None:
        self.last_seq = seq
        self.epoch = epoch
        self._live_start = seq
        if self._live is not None:
            self._live.set()

    async def _live_start_seq(self) -> int | None:
        """The sequence the live consumer started after (from then on it hands every event to
        the hub, in order: a consumer re-made on reconnection goes on from the last one seen);
        None when it has not started within REPLAY_WAIT_S."""
        live = self._live
        if live is None:
            return None
        try:
            await asyncio.wait_for(live.wait(), REPLAY_WAIT_S)
        except TimeoutError:
            return None
        return self._live_start

    def _advance(self, seq: int) -> None:
        if self.last_seq is None or seq > self.last_seq:
            self.last_seq = seq

    def deliver_threadsafe(self, subject: str, payload: bytes) -> None:
        """The in-memory fallback: an event this process could not send over NATS."""
        self._call_in_loop(subject, FALLBACK_ORIGIN, payload)

    def _call_in_loop(
        self,
        subject: str,
        origin: str | None,
        payload: bytes,
        seq: int | None = None,
        stored_at: float | None = None,
    ) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # RuntimeError: the loop closed between the check and the call (the process is stopping).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._handle_stored, subject, origin, payload, seq, stored_at)

    def _handle_stored(
        self,
        subject: str,
        origin: str | None,
        payload: bytes,
        seq: int | None,
        stored_at: float | None,
    ) -> None:
        if stored_at is not None:
            # Measured on the loop, where the sockets are fed: a busy loop is lag too. Clocks of
            # NATS and this host may differ a little; a negative difference counts as none.
            metrics.BRIDGE_EVENT_LAG.observe(max(0.0, time.time() - stored_at))
        self.handle(subject, origin, payload, seq)

    def handle(
        self, subject: str, origin: str | None, payload: bytes, seq: int | None = None
    ) -> None:
        if seq is not None:
            self._advance(seq)
        if subject.startswith(control_prefix(settings.KURS_NATS_PREFIX)):
            return  # a request to the owner (POST /tasks/run), answered by the fetcher
        try:
            event = decode(subject, origin, payload, seq)
        except Dropped as exc:
            self._drop(subject, str(exc))
            return
        if event.kind == "nats.inbound":
            logger.info("bridge: inbound message on %s (%d bytes)", subject, len(payload))
            metrics.NATS_INBOUND.labels(outcome="relayed").inc()
            hub.publish(event.frame, seq)
            return
        assert event.data is not None
        if event.pair is not None:
            try:
                course = snapshot.apply_rate(event.data)
            except ValueError as exc:
                self._drop(subject, str(exc))
                return
            if course is None:
                return  # older than the pair's current version: stale news, not sent
            hub.publish_rate(course.direction, event.frame, seq, event.rate, event.lean)
            return
        if event.kind.startswith("item."):
            snapshot.apply_item(event.kind, event.data)
        hub.publish(event.frame, seq)

    def snapshot_frame(self, pairs: set[str] | None, *, expand: bool = False) -> str:
        """The snapshot of `pairs` now, at this process's position (`last_seq`, `epoch`)."""
        return snapshot_frame(pairs, self.last_seq, self.epoch, expand=expand)

    async def replay(
        self, since: int, epoch: str | None, pairs: Callable[[], set[str] | None]
    ) -> AsyncIterator[tuple[str | None, int | None]]:
        """A resuming socket's prelude (see `realtime.hub`): the subscription's events after
        `since`, read from the stream, then a marker of how far that read covered.

        `pairs()` is the socket's subscription now (None: all). A `since` older than the stream
        holds (or newer than it: the stream was reset), or of another `epoch` than the stream's
        (None: the client did not say), yields a `gap` and a fresh snapshot; so does a stream
        that cannot be read now, with `first_available` null.
        """
        covered = since
        while True:
            cursor = StreamCursor(covered)
            try:
                await cursor.open()
                if epoch is not None and cursor.epoch != epoch:
                    # `since` numbers another stream's events (deleted and made again since):
                    # the same numbers here are other events.
                    for item in self._gap(since, cursor.first_seq, pairs(), cursor.epoch):
                        yield item
                    return
                # A later round (the hand-over's) must read the same stream as this one.
                epoch = cursor.epoch
                if covered + 1 < cursor.first_seq or covered > cursor.last_seq:
                    # Older than the stream holds, or newer (the stream was made anew).
                    for item in self._gap(since, cursor.first_seq, pairs(), cursor.epoch):
                        yield item
                    return
                while not cursor.done:
                    batch = await cursor.batch()
                    wanted = pairs()
                    for stored in batch:
                        try:
                            event = decode(
                                stored.subject, origin_of(stored.headers), stored.data, stored.seq
                            )
                        except Dropped:
                            continue
                        if event.pair is None or wanted is None or event.pair in wanted:
                            yield event.frame, stored.seq
                covered = cursor.last_seq
                # The live feed must take over where the read ends. A consumer that started
                # after the read opened (a web process's first one, made late because the
                # stream was electing its leader) delivers only what follows its start: the
                # events up to there are read too (one more round: the start does not move), or
                # they would reach the client by neither path.
                start = await self._live_start_seq()
                if start is None:
                    raise StreamUnavailable("no live consumer to hand over to")
            except StreamUnavailable as exc:
                logger.warning("bridge: replay after %d broke off: %s", since, exc)
                for item in self._gap(since, None, pairs()):
                    yield item
                return
            finally:
                await cursor.close()
            if start <= covered:
                break
        # Everything up to where the live feed starts was read: held live frames up to there
        # are duplicates.
        yield None, covered

    def _gap(
        self,
        since: int,
        first_available: int | None,
        pairs: set[str] | None,
        epoch: str | None = None,
    ) -> list[tuple[str | None, int | None]]:
        seq = self.last_seq
        return [
            (gap_frame(since, first_available, epoch), None),
            (self.snapshot_frame(pairs), seq),
        ]

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
            # Everything loaded so far (Django, the apps, the snapshot) lives as long as the
            # process: frozen, no collection walks it again. With 1,000 sockets the collector
            # otherwise stopped the loop for 1.4 s in all during one bench run (50 middle and 4
            # full collections, up to 150 ms each: the publish -> all p99); with both lines,
            # one of 41 ms (gc.callbacks timings, bench/bench_realtime.py).
            gc.freeze()
            gc.set_threshold(GC_THRESHOLD_0, *gc.get_threshold()[1:])
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await bridge.stop()
            await asyncio.to_thread(connection.shutdown)
            await send({"type": "lifespan.shutdown.complete"})
            return
