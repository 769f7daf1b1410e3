"""Reading the JetStream stream: the bridge's ordered consumer, and a resuming client's cursor.

Where the server has JetStream, every event (the families of `event_subjects`) is stored in the
stream, and the web process's bridge reads them through one ordered consumer instead of a plain
subscription (`StreamConsumer.consume`), so that each event arrives with its stream sequence,
the `seq` of docs/events.md; the rest of `<prefix>.>` (foreign messages) still comes by a plain
subscription, unnumbered. On every (re)connection the consumer is made anew from the sequence
after the last one the bridge saw: a NATS restart loses nothing the stream kept.

`StreamCursor` reads the stream from a sequence for a client that resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from realtime.nats.link import (
    CONNECT_TIMEOUT_S,
    JETSTREAM_TIMEOUT_S,
    NatsConnection,
    Part,
    StreamUnavailable,
    connection,
)
from realtime.nats.subjects import event_subjects, stream_name

logger = logging.getLogger("realtime.nats")

# The ordered consumer's idle heartbeat: nats-py re-creates it after two missed ones.
CONSUMER_HEARTBEAT_S = 2.0
# A replay reads the stream in batches of this many messages.
REPLAY_BATCH = 256
REPLAY_FETCH_TIMEOUT_S = 2.0
# An abandoned replay consumer (its reader gone with the process) disappears after this.
REPLAY_INACTIVE_S = 30.0

# A message of the consumed subject and its stream sequence (None: plain subscription).
StreamCallback = Callable[[Msg, "int | None"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    subject: str
    headers: dict[str, str] | None
    data: bytes


@dataclass
class _Consumer:
    """What `consume` registered: the subject, the callback and where to start from."""

    subject: str
    callback: StreamCallback
    position: Callable[[], int | None]
    on_start: Callable[[int], None]


async def _end_subscription(sub: Any) -> None:
    """Unsubscribe through nats-py's public call, which also stops an ordered consumer's
    heartbeat and flow-control tasks. It refuses only once the connection is closed or draining
    (the consumer is ended before the connection drains), and those tasks stop by themselves
    when the connection closes."""
    try:
        await sub.unsubscribe()
    except Exception as exc:
        logger.debug("nats: unsubscribe of a consumer failed: %s", exc)


class StreamConsumer(Part):
    """The one consumer per connection (the web process's bridge), re-made on reconnection."""

    def __init__(self, link: NatsConnection) -> None:
        self._link = link
        self._consumer: _Consumer | None = None
        self._subs: list[Any] = []
        self._ordered = False
        self._lock: asyncio.Lock | None = None
        link.add_part(self)

    def consume(
        self,
        subject: str,
        callback: StreamCallback,
        *,
        position: Callable[[], int | None],
        on_start: Callable[[int], None],
    ) -> Future[None]:
        """Read `subject` (under the prefix) in stream order, with sequences, from now on.

        Through an ordered JetStream consumer where the stream exists, else a plain subscription
        (sequence None); re-made on every reconnection, from `position() + 1` (the last sequence
        the caller handled) or, the first time or when the stream was made anew, from the end of
        the stream (`on_start` is told that sequence).
        """
        self._consumer = _Consumer(subject, callback, position, on_start)
        return self._link.submit(self._apply())

    def stop_consuming(self) -> Future[None] | None:
        """End the consumer; the future is done once its subscriptions are (None: not started)."""
        self._consumer = None
        if self._link.loop is None:
            return None
        return self._link.submit(self._apply())

    @property
    def consuming_stream(self) -> bool:
        """True while the consumer reads the stream (frames then carry `seq`)."""
        return self._ordered

    # --- the connection's lifecycle ----------------------------------------------------------
    def loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lock = asyncio.Lock()

    async def connected(self) -> None:
        # Re-made from the last sequence the bridge handled: a restarted server lost the old one.
        await self._apply()

    async def closing(self) -> None:
        subs, self._subs = self._subs, []
        self._ordered = False
        for sub in subs:
            await _end_subscription(sub)

    def forget_after_fork(self) -> None:
        self._consumer = None
        self._subs = []
        self._ordered = False

    # --- making the subscriptions --------------------------------------------------------------
    async def _apply(self) -> None:
        client = self._link.client
        if self._lock is None:
            return
        async with self._lock:
            old, self._subs = self._subs, []
            self._ordered = False
            for sub in old:
                # The server may have lost it (a restart); its inbox subscription is ours to end.
                await _end_subscription(sub)
            consumer = self._consumer
            if consumer is None or client is None or not client.is_connected:
                return
            callback = consumer.callback
            stored: list[str] = []
            if self._link.jetstream:
                stored = event_subjects(self._link.prefix)
                try:
                    await self._subscribe_ordered(client, consumer, stored)
                except Exception as exc:
                    self._link.note_error(f"ordered consumer on {consumer.subject}: {exc}")
                    stored = []
            # The rest of the subject (everything without JetStream; with it, what the stream
            # does not keep: foreign messages) by a plain subscription, without sequences.
            prefixes = tuple(pattern.removesuffix(">") for pattern in stored)

            async def plain(msg: Msg) -> None:
                if prefixes and msg.subject.startswith(prefixes):
                    return  # the ordered consumer delivers it, numbered
                await callback(msg, None)

            self._subs.append(await client.subscribe(consumer.subject, cb=plain))
            await client.flush(timeout=CONNECT_TIMEOUT_S)

    async def _subscribe_ordered(
        self, client: Client, consumer: _Consumer, subjects: list[str]
    ) -> None:
        js = client.jetstream(timeout=JETSTREAM_TIMEOUT_S)
        name = stream_name(self._link.prefix)
        start = consumer.position()
        last = (await js.stream_info(name)).state.last_seq
        if start is None or start > last:
            # First start, or the stream was deleted and made again (its sequences restart):
            # from its end, and the caller forgets positions of the old stream.
            start = last
            consumer.on_start(start)
        callback = consumer.callback

        async def ordered(msg: Msg) -> None:
            await callback(msg, msg.metadata.sequence.stream)

        self._subs.append(
            await js.subscribe(
                consumer.subject,
                stream=name,
                cb=ordered,
                ordered_consumer=True,
                idle_heartbeat=CONSUMER_HEARTBEAT_S,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=ConsumerConfig(opt_start_seq=start + 1, filter_subjects=subjects),
            )
        )
        self._ordered = True
        logger.info("nats: ordered consumer on %s from sequence %d", name, start + 1)


stream_consumer = StreamConsumer(connection)


class StreamCursor:
    """Reads the stream's messages after `since`, up to its last one at `open()`, in order.

    For a client that resumes: an ephemeral pull consumer (no acks, memory only) that exists for
    the length of the read. Its methods are awaited from any loop; the work runs on the NATS one.
    """

    def __init__(self, since: int, link: NatsConnection = connection) -> None:
        self.since = since
        self.first_seq = 0
        self.last_seq = 0
        self.done = False
        self._link = link
        self._sub: Any = None
        self._js: Any = None
        self._name = ""
        # Named here, so that `close()` can delete it by the name it was made with.
        self._consumer_name = f"kurs-replay-{uuid.uuid4().hex}"

    async def open(self) -> None:
        """Read the stream's bounds; StreamUnavailable when it cannot be read now."""
        await self._link.on_loop(self._open())

    async def batch(self) -> list[StoredMessage]:
        if self.done:
            return []
        return list(await self._link.on_loop(self._batch()))

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._link.on_loop(self._close())

    async def _open(self) -> None:
        client = self._link.client
        if client is None or not client.is_connected or not self._link.jetstream:
            raise StreamUnavailable("no JetStream stream to replay from")
        prefix = self._link.prefix
        self._name = stream_name(prefix)
        self._js = client.jetstream(timeout=JETSTREAM_TIMEOUT_S)
        try:
            state = (await self._js.stream_info(self._name)).state
        except Exception as exc:
            raise StreamUnavailable(f"stream {self._name}: {exc}") from exc
        self.first_seq, self.last_seq = state.first_seq, state.last_seq
        if self.since >= self.last_seq:
            self.done = True
            return
        config = ConsumerConfig(
            name=self._consumer_name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(self.since + 1, self.first_seq),
            ack_policy=AckPolicy.NONE,
            filter_subjects=event_subjects(prefix),
            inactive_threshold=REPLAY_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            await self._js.add_consumer(self._name, config)
            self._sub = await self._js.pull_subscribe_bind(
                consumer=self._consumer_name, stream=self._name
            )
        except Exception as exc:
            raise StreamUnavailable(f"replay consumer: {exc}") from exc

    async def _batch(self) -> list[StoredMessage]:
        try:
            msgs = await self._sub.fetch(REPLAY_BATCH, timeout=REPLAY_FETCH_TIMEOUT_S)
        except (NatsTimeoutError, TimeoutError):
            # Nothing came: fine only if nothing is left (messages removed since `open`).
            info = await self._sub.consumer_info()
            if info.num_pending == 0:
                self.done = True
                return []
            raise StreamUnavailable("replay stalled") from None
        except Exception as exc:
            raise StreamUnavailable(f"replay: {exc}") from exc
        stored = []
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq > self.last_seq:
                self.done = True  # past the end fixed at open(): live delivery has those
                break
            stored.append(StoredMessage(seq, msg.subject, msg.headers, msg.data))
            if seq == self.last_seq or meta.num_pending == 0:
                self.done = True
                break
        if not msgs:
            self.done = True
        return stored

    async def _close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._js.delete_consumer(self._name, self._consumer_name)
