"""Publishing: the send queue `realtime.events.publish` fills, its acks, the relay, the fallback.

`publish()` only appends to an in-memory send queue and wakes the connection's loop, so a caller
in any thread, sync or async, never waits for the network. The loop's pump sends the queue on
NATS while connected; when the connection is down, each event goes to the fallback bus instead:
a channel-layer group that every web process's bridge listens on (channels-redis), or, with the
in-memory layer (one process, no Redis), straight to this process's bridge.

Where the server has JetStream, every event is published with a reply subject of this
connection's ack inbox, so the stream's acknowledgement (`PubAck`: stream sequence, duplicate)
comes back without anyone waiting for it. An acknowledged event that came from the database's
outbox (`realtime.outbox`, written in its change's transaction) is marked delivered in batches,
off the publishing path; `on_acked` callbacks hear `(event id, seq)`. What is left undelivered
(published during an outage, or by a process killed between its commit and its publish) is sent
again by the relay, in order and before any newer event: after a reconnection, or when a new
owner of live state takes over (`relay_undelivered`). The stream drops a re-sent event it holds
already (`Nats-Msg-Id` within its duplicate window). docs/events.md#no-lost-event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from channels.layers import InMemoryChannelLayer, channel_layers
from django.conf import settings
from django.db import DatabaseError
from nats.aio.msg import Msg
from nats.js.api import PubAck

from realtime import metrics, outbox_rows
from realtime.nats.link import NatsConnection, Part, connection
from realtime.nats.subjects import FALLBACK_MESSAGE_TYPE, ORIGIN_HEADER, fallback_group

T = TypeVar("T")

logger = logging.getLogger("realtime.nats")

# Bounded memory when both NATS and the fallback stall: the oldest events are dropped first.
OUTBOX_LIMIT = 10_000
# While the first connection is being made, events wait this long for it before they take the
# fallback bus: a one-shot command or a fresh worker publishes right after start-up, and its
# in-memory fallback would reach no one.
FIRST_CONNECT_GRACE_S = 2.0
MSG_ID_HEADER = "Nats-Msg-Id"
# Acknowledged events are marked delivered in one UPDATE per this period (bookkeeping, never on
# the publishing path); delivered rows are pruned at most this often.
BOOKKEEPING_EVERY_S = 1.0
PRUNE_EVERY_S = 60.0
# The relay reads the undelivered rows in batches of this many. After a failed read (a locked
# table, the database unreachable) it is tried again after RELAY_RETRY_FIRST_S, doubling up to
# RELAY_RETRY_S. After JetStream refused an event (a stream electing its leader) the relay runs
# again after REFUSED_RETRY_FIRST_S, doubling up to REFUSED_RETRY_MAX_S while it is refused
# again: newer events wait for it, so it follows a new leader closely.
RELAY_BATCH = 500
RELAY_RETRY_FIRST_S = 0.05
RELAY_RETRY_S = 5.0
REFUSED_RETRY_FIRST_S = 0.25
REFUSED_RETRY_MAX_S = 1.0
# An event JetStream has neither acknowledged nor refused after this long (a stream leader lost
# mid-flight) is taken as not stored: newer events are held back and a relay follows. Short, so
# that a new leader (elected in about 4 s) gets nothing newer before it: acks normally take a
# millisecond. Checked this often.
ACK_TIMEOUT_S = 1.0
ACK_CHECK_S = 0.25
# Newer events wait for the relay at most this long (docs/events.md#the-stream). Longer than a
# replicated stream's election: a follower waits 4-9 s (nats-server's Raft election timeout,
# randomised) for a lost leader before it campaigns, and test_cluster has healed publishing in
# up to 8.9 s under load; so a leader change keeps every event in the stream's order and
# numbered. Beyond it JetStream is refusing for another reason (a stream it cannot make again,
# a full one, no quorum) and liveness wins: events then go live over the fallback bus, as when
# cut off, and reach the stream with the relay, after the older ones, once it accepts again.
HOLD_LIMIT_S = 15.0

# Told `(event id, stream sequence)` for every event JetStream acknowledged (a duplicate too,
# with the sequence the stream first stored it under). Runs on the connection's loop: be quick.
AckCallback = Callable[[str, int], None]


async def _database(work: Callable[[], T]) -> T:
    """`work` (sync ORM) in a worker thread, its connection closed after it."""
    return await asyncio.to_thread(outbox_rows.in_worker_thread, work)


class Outbox(Part):
    """Queued events and the pump that sends them, over NATS or the fallback bus; their acks,
    the books of the database outbox, and the relay of what it holds undelivered."""

    def __init__(self, link: NatsConnection) -> None:
        self._link = link
        self._queue: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._wakeup_pending = False
        self._wake: asyncio.Event | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._local_fallback: Callable[[str, bytes], None] | None = None
        self._layer: Any = None
        self._counts = {"nats": 0, "fallback": 0, "dropped": 0, "acked": 0, "relayed": 0}
        self._ack_callbacks: list[AckCallback] = []
        self._ack_client: Any = None
        self._ack_inbox = ""
        self._acked: list[str] = []
        self._books_due: asyncio.Event | None = None
        self._books_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._in_flight: dict[str, float] = {}  # event id -> time.monotonic() it was sent
        # Subject -> the event id in flight on it: the next event of a subject (a pair) waits for
        # the previous one's answer, so that one lost without an answer (its stream leader
        # killed) cannot be overtaken by the next; acks take a millisecond.
        self._busy: dict[str, str] = {}
        self._busy_subject: dict[str, str] = {}  # event id -> its subject, while in `_busy`
        # time.monotonic() of the last prune; never: -inf, so the first books written prune
        # (0.0 would put it off until PRUNE_EVERY_S after boot: monotonic time counts from it).
        self._pruned_at = -math.inf
        self._relay_due = False
        self._relay_after = 0.0  # time.monotonic() before which a failed relay is not retried
        # The relay's last read of the database failed: until one succeeds, newer events take
        # the fallback bus (live) and reach the stream through the relay, after the older ones.
        self._relay_unreadable = False
        self._relay_backoff = 0.0
        # JetStream refused (or never answered) an event this process keeps the books of: newer
        # events wait in the queue, while connected, until a relay's events are all acknowledged,
        # so that the stream keeps the order they were written in (docs/events.md#the-stream).
        self._held = False
        self._held_since = 0.0  # time.monotonic() the hold began (see HOLD_LIMIT_S)
        self._held_too_long = False  # past HOLD_LIMIT_S: newer events take the fallback bus
        # The events of this hold that went live over the fallback bus (each goes once).
        self._live_only: set[str] = set()
        self._stream_check: asyncio.Task[None] | None = None
        self._refused_backoff = 0.0
        self._relaying = False
        self._relayed_unacked: set[str] = set()
        self._relayed_any = False  # then this process keeps the books of what it relayed
        # (subject, payload) -> relay this row? Set by an owner of some shards (rates.shards):
        # it relays only its shards' events. None: every row.
        self.relay_filter: Callable[[str, str], bool] | None = None
        self._books_failing = False  # the bookkeeping's failure was logged (once per outage)
        self._flushing = False
        self._idle = threading.Condition()
        link.add_part(self)

    def publish(self, subject: str, payload: bytes, event_id: str | None = None) -> None:
        """Queue one message; never blocks on the network, callable from any thread."""
        self._link.start()
        headers = {ORIGIN_HEADER: settings.KURS_INSTANCE}
        if event_id:
            # JetStream drops a duplicate of the same id inside its window.
            headers[MSG_ID_HEADER] = event_id
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

    def add_ack_callback(self, callback: AckCallback) -> None:
        if callback not in self._ack_callbacks:
            self._ack_callbacks.append(callback)

    def remove_ack_callback(self, callback: AckCallback) -> None:
        if callback in self._ack_callbacks:
            self._ack_callbacks.remove(callback)

    def request_relay(self) -> None:
        """Send what the database outbox holds undelivered, before any newer event."""
        self._link.start()
        self._relay_due = True
        self._relay_after = 0.0
        self._link.call_soon(self._kick)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every queued event was sent or took the fallback bus, and no relay that
        could run is left to do; False when `timeout` passed first (tests, benchmarks)."""
        with self._idle:
            return self._idle.wait_for(self._is_idle, timeout)

    def _is_idle(self) -> bool:
        relay_pending = self._relay_due and self._link.connected.is_set()
        return not (self._queue or self._flushing or relay_pending)

    def _holding(self) -> bool:
        """Newer events wait for the relay (see `_held`); not while cut off from NATS, when
        they take the fallback bus live and reach the stream with the relay."""
        return self._held and self._link.connected.is_set()

    def set_local_fallback(self, deliver: Callable[[str, bytes], None] | None) -> None:
        """Where fallback events go with the in-memory channel layer (this process's bridge)."""
        self._local_fallback = deliver

    # --- the connection's lifecycle ----------------------------------------------------------
    def loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._counts = dict.fromkeys(self._counts, 0)
        self._wake = asyncio.Event()
        self._pump_task = loop.create_task(self._pump())
        self._books_due = asyncio.Event()
        self._books_task = loop.create_task(self._keep_books())
        self._watch_task = loop.create_task(self._watch_acks())
        self._ack_client = None
        self._acked = []
        self._in_flight = {}
        self._busy = {}
        self._busy_subject = {}

    async def connected(self) -> None:
        client = self._link.client
        if client is not None and client is not self._ack_client:
            # One wildcard subscription per client; nats-py keeps it across reconnections.
            inbox = client.new_inbox()
            await client.subscribe(f"{inbox}.*", cb=self._on_ack)
            self._ack_client, self._ack_inbox = client, inbox
        # Answers to what was in flight on the old connection may never come: no subject waits
        # for them (the relay below sends those events again first, for a process keeping books).
        self._busy.clear()
        self._busy_subject.clear()
        if self._relayed_any or outbox_rows.recorded_here():
            # Whatever this process sent while the server was away (or whose ack it lost) goes
            # again, before anything newer: the stream drops what it has already. At once: a
            # retry planned on the previous connection must not let newer events go first.
            self._relay_due = True
            self._relay_after = 0.0
        if self._held:
            # A hold from before the connection was lost: its time limit starts again with
            # this connection's relay, which JetStream normally takes at once.
            self._held = False
            self._hold()

    def ready(self) -> None:
        self._kick()

    async def closing(self) -> None:
        await self._flush()
        if self._pump_task is not None:
            self._pump_task.cancel()
        for task in (self._books_task, self._watch_task):
            if task is not None:
                task.cancel()
        await self._write_books(final=True)

    async def closed(self) -> None:
        if self._layer is not None and hasattr(self._layer, "close_pools"):
            await self._layer.close_pools()
        self._layer = None
        logger.info(
            "nats: closed (published %d, fallback %d, dropped %d, acked %d, relayed %d, errors %d)",
            self._counts["nats"],
            self._counts["fallback"],
            self._counts["dropped"],
            self._counts["acked"],
            self._counts["relayed"],
            self._link.errors,
        )

    def stopped(self) -> None:
        # Forget everything this process sent, relayed or wrote: a restarted connection (the
        # next test, a second lifespan) is not held behind rows of an earlier life's relay.
        self.forget_after_fork()
        self._relayed_any = False
        self._relay_after = 0.0
        self._relay_backoff = 0.0
        self._refused_backoff = 0.0
        outbox_rows.forget_recorded()

    def forget_after_fork(self) -> None:
        self._queue.clear()
        self._wakeup_pending = False
        self._acked = []
        self._ack_client = None
        self._relay_due = False
        self._relay_unreadable = False
        self._held = False
        self._held_since = 0.0
        self._held_too_long = False
        self._live_only = set()
        self._stream_check = None
        self._relaying = False
        self._relayed_unacked = set()
        self._flushing = False
        self._idle = threading.Condition()
        self._in_flight = {}
        self._busy = {}
        self._busy_subject = {}

    def status(self) -> dict[str, Any]:
        return {
            "published": self._counts["nats"],
            "acked": self._counts["acked"],
            "relayed": self._counts["relayed"],
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
        self._flushing = True
        try:
            await self._link.wait_first_attempt(FIRST_CONNECT_GRACE_S)
            await self._drain()
        finally:
            with self._idle:
                self._flushing = False
                self._idle.notify_all()

    async def _drain(self) -> None:
        queue = self._queue
        while True:
            if self._relay_due and self._link.connected.is_set():
                # Before the next event: the stream keeps each pair's events in their order.
                await self._relay()
            if not queue:
                return
            if self._holding():
                if not self._held_too_long:
                    if time.monotonic() - self._held_since < HOLD_LIMIT_S:
                        return
                    self._hold_expired()
                    continue  # the relay first: the older events go live first
                # Held past HOLD_LIMIT_S: live over the fallback bus rather than not at all. A
                # stored event stays undelivered in the outbox, and the relay (still planned
                # while JetStream refuses) brings it to the stream after the older ones.
                subject, payload, headers = queue.popleft()
                event_id = headers.get(MSG_ID_HEADER)
                if event_id not in self._live_only:  # not sent live by a relay already
                    if event_id:
                        self._live_only.add(event_id)
                    await self._publish_fallback(subject, payload)
                continue
            if self._waits_for_ack(queue[0][0]):
                return
            subject, payload, headers = queue.popleft()
            # Behind a relay that cannot read the database, a newer event must not reach the
            # stream first: it goes live over the fallback, and to the stream with the relay.
            if not self._relay_unreadable and await self._send(subject, payload, headers):
                continue
            if outbox_rows.recorded_here():
                self._relay_due = True  # it may be a stored event: the stream gets it later
            await self._publish_fallback(subject, payload)

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str]) -> bool:
        """Publish on NATS, asking JetStream for its ack; False when not connected or failed.

        Not before the connection's parts heard `connected` (the stream ensured, a relay
        planned): in between, nats-py is connected but the relay has not run yet.
        """
        client = self._link.client
        if client is None or not client.is_connected or not self._link.connected.is_set():
            return False
        event_id = headers.get(MSG_ID_HEADER, "")
        stream = bool(self._link.jetstream and self._ack_inbox and event_id)
        try:
            await client.publish(
                subject,
                payload,
                reply=f"{self._ack_inbox}.{event_id}" if stream else "",
                headers=headers,
            )
        except Exception as exc:
            self._link.note_error(f"publish on {subject} failed: {exc}")
            return False
        self._counts["nats"] += 1
        metrics.NATS_PUBLISHES.labels(path="nats").inc()
        if stream and len(self._in_flight) < OUTBOX_LIMIT:
            self._in_flight.pop(event_id, None)  # a re-sent event goes to the end: oldest first
            self._in_flight[event_id] = time.monotonic()
            self._busy[subject] = event_id
            self._busy_subject[event_id] = subject
        if event_id and not stream and self._link.jetstream is False:
            # A server without JetStream acknowledges nothing and keeps nothing to replay: sent
            # is as delivered as it gets (at most once).
            self._book(event_id)
        return True

    # --- acks, the books and the relay ---------------------------------------------------------
    async def _on_ack(self, msg: Msg) -> None:
        event_id = msg.subject.rsplit(".", 1)[-1]
        self._answered(event_id)
        try:
            answer = json.loads(msg.data)
            if "error" in answer:
                raise ValueError(answer["error"])
            ack = PubAck.from_response(answer)
        except (ValueError, TypeError, KeyError):
            # No JSON (a no-responders status: no stream took the subject, JetStream not ready
            # yet) or an error answer: not stored. Sent again by a relay a little later (after
            # newer events, then: the one case where a pair's events reach the stream out of
            # version order; the snapshot and clients order them by `version`).
            # Logged once per hold: a relay of many rows, refused again, is one WARNING.
            self._link.note_error(
                f"no JetStream ack for {event_id}: {msg.data[:200]!r}", quiet=self._held
            )
            if self._relayed_any or outbox_rows.recorded_here():
                self._refused()
                self._check_stream()
            return
        self._counts["acked"] += 1
        self._book(event_id)
        self._relayed_unacked.discard(event_id)
        self._release_if_relayed()
        for callback in list(self._ack_callbacks):
            try:
                callback(event_id, ack.seq)
            except Exception:
                logger.exception("nats: ack callback %r failed for %s", callback, event_id)

    def _book(self, event_id: str) -> None:
        if not (self._relayed_any or outbox_rows.recorded_here()):
            return  # this process neither wrote nor relayed outbox rows: nothing to mark
        self._acked.append(event_id)
        if self._books_due is not None:
            self._books_due.set()

    async def _keep_books(self) -> None:
        assert self._books_due is not None
        while True:
            await self._books_due.wait()
            # Batched: one UPDATE for every ack of the period.
            await asyncio.sleep(BOOKKEEPING_EVERY_S)
            self._books_due.clear()
            try:
                await self._write_books()
            except Exception:
                # A bug, not the database: logged, and the books are kept on.
                logger.exception("nats: outbox bookkeeping failed")
            if self._acked:
                self._books_due.set()  # not written this round: the next round tries again

    async def _write_books(self, *, final: bool = False) -> None:
        acked, self._acked = self._acked, []
        prune = time.monotonic() - self._pruned_at >= PRUNE_EVERY_S
        if not acked:
            return
        if final:
            try:
                await _database(partial(outbox_rows.mark_delivered, acked))
            except Exception as exc:
                # At interpreter exit the worker threads (or a test's database) may be gone:
                # these rows are sent again by the next relay, and the stream drops them.
                logger.debug("nats: outbox books not written at shutdown: %s", exc)
            return
        try:
            await _database(partial(outbox_rows.mark_delivered, acked))
            if prune:
                self._pruned_at = time.monotonic()
                await _database(outbox_rows.prune)
        except DatabaseError as exc:
            # Tried again next round (a row left unmarked would only be sent again by a later
            # relay, and dropped by the stream within its duplicate window).
            self._books_failed(exc)
            if len(self._acked) < OUTBOX_LIMIT:
                self._acked[:0] = acked
            return
        if self._books_failing:
            self._books_failing = False
            logger.info("nats: outbox bookkeeping written again")

    def _books_failed(self, exc: DatabaseError) -> None:
        """Logged once per outage (a locked table, the database away); debug while it lasts."""
        if self._books_failing:
            logger.debug("nats: outbox bookkeeping failed again: %s", exc)
            return
        self._books_failing = True
        self._link.note_error(f"outbox bookkeeping failed, tried again each second: {exc}")

    async def _watch_acks(self) -> None:
        """Every ACK_CHECK_S: events sent ACK_TIMEOUT_S ago with no answer call for a relay."""
        while True:
            await asyncio.sleep(ACK_CHECK_S)
            cutoff = time.monotonic() - ACK_TIMEOUT_S
            late = []
            for event_id, sent in self._in_flight.items():  # oldest first
                if sent >= cutoff:
                    break
                late.append(event_id)
            for event_id in late:
                self._answered(event_id)
            if late and (self._relayed_any or outbox_rows.recorded_here()):
                self._link.note_error(f"no JetStream ack for {len(late)} events in time")
                self._hold()
                self._relay_due = True
                self._relay_after = 0.0
                self._kick()
                # No answer at all is also what a deleted stream gives while this subject has
                # other subscribers (a web process's own bridge): no "no responders" then.
                self._check_stream()

    def _waits_for_ack(self, subject: str) -> bool:
        """The subject's previous event is still unanswered (only while connected: cut off,
        events take the fallback bus and no answer is coming)."""
        return subject in self._busy and self._link.connected.is_set()

    def _answered(self, event_id: str) -> None:
        """Acknowledged, refused or given up on: its subject may send its next event."""
        self._in_flight.pop(event_id, None)
        subject = self._busy_subject.pop(event_id, None)
        if subject is not None and self._busy.get(subject) == event_id:
            del self._busy[subject]
            if self._queue and self._queue[0][0] == subject:
                self._kick()  # the pump waits for this one

    def _refused(self) -> None:
        """JetStream refused an event (no stream leader now): hold newer events back and relay,
        sooner at first, then less often while it keeps refusing."""
        if not self._held:
            logger.info("nats: JetStream refused an event; newer events wait for the relay")
        self._hold()
        if self._relay_due:
            return  # one relay is planned already: one back-off step per relay, not per event
        self._refused_backoff = min(
            REFUSED_RETRY_MAX_S, max(REFUSED_RETRY_FIRST_S, self._refused_backoff * 2)
        )
        self._relay_later(self._refused_backoff)

    def _hold(self) -> None:
        """Newer events wait for the relay (on the loop), for HOLD_LIMIT_S at most."""
        if self._held:
            return
        self._held = True
        self._held_since = time.monotonic()
        self._held_too_long = False
        asyncio.get_running_loop().call_later(HOLD_LIMIT_S, self._kick)

    def _hold_expired(self) -> None:
        """Held HOLD_LIMIT_S: from now until JetStream acknowledges the relay again, each
        event goes live over the fallback bus once (the relay's own, at once, then the held
        ones), and to the stream with the relay."""
        self._held_too_long = True
        self._relay_due = True
        self._relay_after = 0.0
        logger.warning(
            "nats: JetStream has refused the relay for %.0fs; events go live over the fallback "
            "bus and reach the stream with the relay once it accepts",
            HOLD_LIMIT_S,
        )

    def _check_stream(self) -> None:
        """A refusal, or no answer, may say the stream is gone (deleted, a server restarted
        with an empty store): one check at a time (the connection's `reconcile_stream`, at
        most every 2 s), and a relay at once when the stream was made again."""
        if self._stream_check is not None and not self._stream_check.done():
            return

        async def check() -> None:
            if await self._link.reconcile_stream():
                self._relay_due = True
                self._relay_after = 0.0
                self._kick()

        self._stream_check = asyncio.get_running_loop().create_task(check())

    def _release_if_relayed(self) -> None:
        """Every event of the last relay acknowledged: newer events may go again."""
        if self._held and not (self._relaying or self._relay_due or self._relayed_unacked):
            self._held = False
            self._held_too_long = False
            self._live_only = set()
            self._refused_backoff = 0.0
            logger.info("nats: JetStream acknowledges again; held events go on")
            self._kick()

    def _relay_later(self, delay: float = RELAY_RETRY_S) -> None:
        """A relay in `delay` seconds, or with the next event after that (on the loop)."""
        self._relay_due = True
        self._relay_after = time.monotonic() + delay
        asyncio.get_running_loop().call_later(delay, self._kick)

    async def _relay(self) -> None:
        wait = self._relay_after - time.monotonic()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._kick)  # not before, not never
            return
        self._relay_due = False
        self._relaying = True
        self._relayed_unacked = set()
        try:
            await self._relay_rows()
        finally:
            self._relaying = False
        self._release_if_relayed()

    async def _relay_rows(self) -> None:
        after, relayed = 0, 0
        acked = set(self._acked) if self._held_too_long else set()
        while True:
            try:
                rows = await _database(
                    partial(outbox_rows.undelivered, after, RELAY_BATCH, self._link.prefix)
                )
            except DatabaseError as exc:
                self._relay_unreadable = True
                self._relay_backoff = min(
                    RELAY_RETRY_S, max(RELAY_RETRY_FIRST_S, self._relay_backoff * 2)
                )
                self._relay_later(self._relay_backoff)
                self._link.note_error(f"outbox relay cannot read the database: {exc}")
                return
            self._relay_unreadable, self._relay_backoff = False, 0.0
            self._relayed_any = self._relayed_any or bool(rows)
            wanted = self.relay_filter
            for position, event_id, subject, payload in rows:
                if wanted is not None and not wanted(subject, payload):
                    after = position  # another shard's owner relays it
                    continue
                headers = {ORIGIN_HEADER: settings.KURS_INSTANCE, MSG_ID_HEADER: event_id}
                if self._link.jetstream:
                    # Newer events wait until JetStream acknowledged every relayed one: a
                    # relayed event it refuses (no leader yet) must not land after them. Noted
                    # before the send: its ack may come back while the relay is still sending.
                    self._hold()
                    self._relayed_unacked.add(event_id)
                if not await self._send(subject, payload.encode(), headers):
                    self._relay_due = True  # cut off again: the rest on the next connection
                    return
                if self._held_too_long and event_id not in self._live_only:
                    self._live_only.add(event_id)
                    if event_id not in acked:  # stored already, its books not written yet
                        await self._publish_fallback(subject, payload.encode())
                after, relayed = position, relayed + 1
            if len(rows) < RELAY_BATCH:
                break
        if relayed:
            self._counts["relayed"] += relayed
            logger.info("nats: relayed %d undelivered outbox events", relayed)

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


def on_acked(callback: AckCallback) -> None:
    """Call `callback(event_id, seq)` for every event JetStream acknowledges to this process.

    `seq` is the event's stream sequence (the `seq` clients see). It runs on the NATS thread's
    loop and must not block: hand the pair to your own queue or thread.
    """
    outbox.add_ack_callback(callback)


def relay_undelivered() -> None:
    """Send the database outbox's undelivered events, in order (a new owner of live state)."""
    outbox.request_relay()


def relay_only(wanted: Callable[[str, str], bool] | None) -> None:
    """Relay only the undelivered rows `wanted(subject, payload)` accepts (None: every row)."""
    outbox.relay_filter = wanted


def transport(subject: str, envelope: dict[str, Any], payload: str) -> None:
    """The `realtime.events` transport: the payload as encoded once (the outbox row's), queued."""
    outbox.publish(subject, payload.encode(), envelope.get("id"))
