"""Reading the JetStream stream: the bridge's ordered consumer, and a resuming client's cursor.

Where the server has JetStream, every event (the families of `event_subjects`) is stored in the
stream, and the web process's bridge reads them through one ordered consumer instead of a plain
subscription (`StreamConsumer.consume`), so that each event arrives with its stream sequence,
the `seq` of docs/events.md; the rest of `<prefix>.>` (foreign messages) still comes by a plain
subscription, unnumbered. On every (re)connection the consumer is made anew from the sequence
after the last one the bridge saw: a NATS restart loses nothing the stream kept.

`StreamCursor` reads the stream from a sequence for a client that resumes.

A stream's *epoch* (`stream_epoch`) names its incarnation: a stream deleted and made again starts
its sequences at 1 again, so a `seq` means something only with the epoch it was read in
(docs/events.md#resume-without-loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

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

T = TypeVar("T")
logger = logging.getLogger("realtime.nats")

# The ordered consumer's idle heartbeat: nats-py re-creates it after two missed ones (its node
# lost: within 2-4 s, then every 2 s until the stream's new leader takes it).
CONSUMER_HEARTBEAT_S = 1.0
# An ordered consumer that could not be made (no stream leader) is tried again this often.
CONSUMER_RETRY_S = 1.0
# A replay reads the stream in batches of this many messages.
REPLAY_BATCH = 256
REPLAY_FETCH_TIMEOUT_S = 2.0
# An abandoned replay consumer (its reader gone with the process) disappears after this.
REPLAY_INACTIVE_S = 30.0
# A stream that cannot be read now (a cluster electing the stream's leader, in about 4 s; the
# node holding the replay's consumer lost) is tried again every REPLAY_RETRY_S, from the last
# sequence read, for up to REPLAY_WAIT_S before the replay gives up (the client gets `gap`).
REPLAY_WAIT_S = 10.0
REPLAY_RETRY_S = 0.25

# JetStream's advisories of a stream made or deleted (`<kind>.<stream>`): the consumer is made
# again, from the start of a stream made anew (its sequences start again at 1).
STREAM_ADVISORIES = "$JS.EVENT.ADVISORY.STREAM.*.{name}"
REMADE_ADVISORIES = {"CREATED", "DELETED"}

# The epoch's digits: base 36 of the stream's creation time in microseconds (10 characters
# until the year 2085); a client only compares it.
EPOCH_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stream_epoch(created: datetime | None) -> str | None:
    """The epoch of a stream made at `created` (JetStream's stream info `created`, which
    nats-server keeps in the stream's metadata: the same on every replica and across restarts,
    another for a stream deleted and made again); None when the server did not say."""
    if created is None:
        return None
    # Integer arithmetic (a float timestamp could round a microsecond away).
    micros = (created - UNIX_EPOCH) // timedelta(microseconds=1)
    digits = ""
    while True:
        micros, digit = divmod(micros, 36)
        digits = EPOCH_DIGITS[digit] + digits
        if not micros:
            return digits


# A message of the consumed subject and its stream sequence (None: plain subscription).
StreamCallback = Callable[[Msg, "int | None"], Awaitable[None]]


class StreamMadeAnew(StreamUnavailable):
    """The stream a replay reads was deleted and made again: trying again will not help."""


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
    on_start: Callable[[int, str | None], None]


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
        self._retry: asyncio.Task[None] | None = None
        # When the stream read was made (JetStream's `created`): another one means it was made
        # anew (deleted and made again, a server restarted with an empty store).
        self._stream_created: datetime | None = None
        self._advisory_client: Any = None
        self._advisory_task: asyncio.Task[None] | None = None
        link.add_part(self)

    def consume(
        self,
        subject: str,
        callback: StreamCallback,
        *,
        position: Callable[[], int | None],
        on_start: Callable[[int, str | None], None],
    ) -> Future[None]:
        """Read `subject` (under the prefix) in stream order, with sequences, from now on.

        Through an ordered JetStream consumer where the stream exists, else a plain subscription
        (sequence None); re-made on every reconnection, from `position() + 1` (the last sequence
        the caller handled) or, the first time or when the stream was made anew, from the end of
        the stream (`on_start` is told that sequence and the stream's epoch).
        """
        self._consumer = _Consumer(subject, callback, position, on_start)
        return self._link.submit(self._apply())

    def stop_consuming(self) -> Future[None] | None:
        """End the consumer; the future is done once its subscriptions are (None: not started)."""
        self._consumer = None
        self._stream_created = None
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
        self._retry = None

    async def connected(self) -> None:
        client = self._link.client
        if client is not None and client is not self._advisory_client:
            # One subscription per client; nats-py keeps it across reconnections.
            name = stream_name(self._link.prefix)
            await client.subscribe(STREAM_ADVISORIES.format(name=name), cb=self._on_advisory)
            self._advisory_client = client
        # Re-made from the last sequence the bridge handled: a restarted server lost the old one.
        await self._apply()

    async def _on_advisory(self, msg: Msg) -> None:
        """The stream was deleted or made (by anyone: an operator, another Kurs process making
        it again after a refusal): the ordered consumer is made again, from the start of the
        new stream, or tried every second until there is one. A task of its own: `_apply` ends
        subscriptions, and must not be cancelled with this callback's."""
        kind = msg.subject.split(".")[-2]
        if kind in REMADE_ADVISORIES and self._consumer is not None:
            logger.info(
                "nats: stream %s %s; the ordered consumer is made again",
                msg.subject.split(".")[-1],
                kind.lower(),
            )
            self._advisory_task = asyncio.get_running_loop().create_task(self._apply())

    async def closing(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        subs, self._subs = self._subs, []
        self._ordered = False
        for sub in subs:
            await _end_subscription(sub)

    def forget_after_fork(self) -> None:
        self._consumer = None
        self._stream_created = None
        self._advisory_client = None
        self._advisory_task = None
        self._retry = None
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
                    # The stream is there but cannot be read now (a cluster electing its
                    # leader): its events are not taken from the plain subscription meanwhile
                    # (unnumbered, then again numbered), the consumer is tried again shortly
                    # from the last sequence handled, and skips nothing.
                    self._link.note_error(f"ordered consumer on {consumer.subject}: {exc}")
                    self._retry_later()
            # The rest of the subject (everything without JetStream; with it, what the stream
            # does not keep: foreign messages) by a plain subscription, without sequences.
            prefixes = tuple(pattern.removesuffix(">") for pattern in stored)

            async def plain(msg: Msg) -> None:
                if prefixes and msg.subject.startswith(prefixes):
                    return  # the ordered consumer delivers it, numbered
                await callback(msg, None)

            self._subs.append(await client.subscribe(consumer.subject, cb=plain))
            await client.flush(timeout=CONNECT_TIMEOUT_S)

    def _retry_later(self) -> None:
        loop = self._link.loop
        if loop is None or (self._retry is not None and not self._retry.done()):
            return

        async def retry() -> None:
            await asyncio.sleep(CONSUMER_RETRY_S)
            self._retry = None
            if not self._ordered:
                await self._apply()

        self._retry = loop.create_task(retry())

    async def _subscribe_ordered(
        self, client: Client, consumer: _Consumer, subjects: list[str]
    ) -> None:
        js = client.jetstream(timeout=JETSTREAM_TIMEOUT_S)
        name = stream_name(self._link.prefix)
        start = consumer.position()
        info = await js.stream_info(name)
        last = info.state.last_seq
        anew = self._stream_created is not None and info.created != self._stream_created
        self._stream_created = info.created
        if anew:
            # Made anew since it was last read: every event in it was stored after what this
            # process read of the old one (the relay's first), so from its start; the caller
            # forgets positions of the old stream.
            start = max(0, info.state.first_seq - 1)
            consumer.on_start(start, stream_epoch(info.created))
        elif start is None or start > last:
            # First start, or a stream made anew that was not read before: from its end.
            start = last
            consumer.on_start(start, stream_epoch(info.created))
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
        # The stream's epoch at the first `open()`: the incarnation `first_seq`..`last_seq` are of.
        self.epoch: str | None = None
        self.done = False
        self._link = link
        self._sub: Any = None
        self._js: Any = None
        self._name = ""
        self._opened = False
        # Named when made, so that `close()` can delete it by the name it was made with.
        self._consumer_name = ""

    async def open(self) -> None:
        """Read the stream's bounds; StreamUnavailable when it cannot be read within
        REPLAY_WAIT_S (not connected, or the stream has no leader that long)."""
        await self._link.on_loop(self._patiently(self._open))

    async def batch(self) -> list[StoredMessage]:
        """The next messages; a consumer lost with its node is made again from the last
        sequence read (StreamUnavailable when that fails for REPLAY_WAIT_S)."""
        if self.done:
            return []
        return list(await self._link.on_loop(self._patiently(self._batch)))

    async def _patiently(self, step: Callable[[], Awaitable[T]]) -> T:
        """`step()`, tried again from where the read stands while the stream is unreadable."""
        deadline = asyncio.get_running_loop().time() + REPLAY_WAIT_S
        while True:
            try:
                return await step()
            except StreamUnavailable as exc:
                client = self._link.client
                if (
                    isinstance(exc, StreamMadeAnew)
                    or asyncio.get_running_loop().time() + REPLAY_RETRY_S > deadline
                    or client is None
                    or not self._link.jetstream
                ):
                    raise
            await self._close()  # a consumer on a lost node: made again from `since`
            await asyncio.sleep(REPLAY_RETRY_S)

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
            info = await self._js.stream_info(self._name)
        except Exception as exc:
            raise StreamUnavailable(f"stream {self._name}: {exc}") from exc
        state, epoch = info.state, stream_epoch(info.created)
        if not self._opened:
            # The bounds of the read are fixed by the first open; a re-open goes on from `since`.
            self.first_seq, self.last_seq = state.first_seq, state.last_seq
            self.epoch = epoch
            self._opened = True
        elif epoch != self.epoch:
            # Made anew since the first open: its numbers are not the ones being read. The read
            # breaks off (the client gets `gap`) rather than going on in another stream.
            raise StreamMadeAnew(f"stream {self._name} was made anew during the replay")
        if self.since >= self.last_seq:
            self.done = True
            return
        # A name of its own each time: a consumer lost with its node may linger under the old one.
        self._consumer_name = f"kurs-replay-{uuid.uuid4().hex}"
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
        if self._sub is None:
            await self._open()  # made again after a failed read
            if self.done:
                return []
        try:
            msgs = await self._sub.fetch(REPLAY_BATCH, timeout=REPLAY_FETCH_TIMEOUT_S)
        except (NatsTimeoutError, TimeoutError):
            # Nothing came: fine only if nothing is left (messages removed since `open`).
            try:
                info = await self._sub.consumer_info()
            except Exception as exc:
                raise StreamUnavailable(f"replay: {exc}") from exc
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
            self.since = seq  # where a consumer made again goes on from
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
