"""The transactional outbox (docs/events.md#no-lost-event), against a real JetStream.

An event is written in its change's transaction, published after the commit with its id as
`Nats-Msg-Id`, marked delivered once JetStream acknowledged it; what could not be sent (NATS
down) reaches the stream, in order, before anything newer once NATS is back; the stream is
reconciled with Kurs's configuration at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import transaction
from nats.js.api import DiscardPolicy, StreamConfig

from realtime import events, outbox_rows
from realtime import nats as realtime_nats
from realtime.bridge import bridge
from realtime.models import OutboxEvent
from realtime.nats import connection, publishing, stream_consumer, stream_name
from realtime.nats.link import STREAM_DUPLICATE_WINDOW_S, STREAM_MAX_AGE_S
from realtime.nats.subjects import event_subjects
from realtime.tests.conftest import connect, receive
from tests.services import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True)]


class Acks:
    """What `on_acked` told this test: event id -> stream sequence."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self._changed = threading.Condition()

    def __call__(self, event_id: str, seq: int) -> None:
        with self._changed:
            self.seqs[event_id] = seq
            self._changed.notify_all()

    def wait_for(self, ids: list[str], within: float = 15.0) -> dict[str, int]:
        with self._changed:
            assert self._changed.wait_for(lambda: set(ids) <= set(self.seqs), within), (
                f"not acknowledged: {set(ids) - set(self.seqs)}"
            )
            return {event_id: self.seqs[event_id] for event_id in ids}


@contextlib.contextmanager
def listening_acks() -> Iterator[Acks]:
    seen = Acks()
    realtime_nats.on_acked(seen)
    try:
        yield seen
    finally:
        realtime_nats.outbox.remove_ack_callback(seen)


@pytest.fixture
def acks() -> Iterator[Acks]:
    with listening_acks() as seen:
        yield seen


def rate(version: int) -> dict[str, object]:
    return {"direction": "BTC-USD", "value": 100 + version, "version": version}


def write(version: int) -> str:
    """One change and its event, in one transaction: the event's id."""
    with transaction.atomic():
        events.publish_on_commit("rate.updated", rate(version))
        return str(OutboxEvent.objects.order_by("-id").values_list("event_id", flat=True)[0])


async def written_and_acked(acks: Acks, versions: range) -> list[str]:
    """Connected, `versions` written one transaction each and acknowledged: their event ids."""
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15)
    sent = [await sync_to_async(write)(v) for v in versions]
    await asyncio.to_thread(acks.wait_for, sent)
    return sent


async def wait_until(check: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await sync_to_async(check)():
        assert time.monotonic() < deadline, f"{what}: not within {within:g}s"
        await asyncio.sleep(0.05)


async def stream_rates(server: NatsServer, prefix: str) -> list[tuple[int, str, int]]:
    """Every rate event the stream holds: (seq, event id, version)."""
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        last = (await js.stream_info(stream_name(prefix))).state.last_seq
        sub = await js.subscribe(f"{prefix}.rates.>", ordered_consumer=True)
        got: list[tuple[int, str, int]] = []
        while not got or got[-1][0] < last:
            msg = await sub.next_msg(timeout=5)
            body = json.loads(msg.data)
            got.append((msg.metadata.sequence.stream, body["id"], body["data"]["version"]))
        await sub.unsubscribe()
        return got
    finally:
        await client.close()


def undelivered() -> int:
    return OutboxEvent.objects.filter(delivered_at__isnull=True).count()


async def test_an_event_is_written_with_its_change_and_marked_delivered_once_acknowledged(
    own_jetstream: NatsServer, acks: Acks, prefix: str
) -> None:
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15)
    event_id = await sync_to_async(write)(1)
    seq = (await asyncio.to_thread(acks.wait_for, [event_id]))[event_id]
    stored = await stream_rates(own_jetstream, prefix)
    assert stored == [(seq, event_id, 1)]
    await wait_until(lambda: undelivered() == 0, "the row marked delivered")
    row = await sync_to_async(OutboxEvent.objects.get)(event_id=event_id)
    assert json.loads(row.payload)["id"] == event_id
    assert row.subject == f"{prefix}.rates.BTC-USD"
    # The envelope is encoded once: the stream holds the very bytes the row stores.
    client = await nats.connect(own_jetstream.url)
    try:
        sent = await client.jetstream().get_msg(stream_name(prefix), seq)
    finally:
        await client.close()
    assert sent.data == row.payload.encode()


async def test_a_rolled_back_change_leaves_no_event(own_jetstream: NatsServer) -> None:
    def change_that_fails() -> None:
        with transaction.atomic():
            events.publish_on_commit("rate.updated", rate(1))
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        await sync_to_async(change_that_fails)()
    assert await sync_to_async(OutboxEvent.objects.count)() == 0


async def test_a_shutdown_forgets_the_rows_this_process_wrote() -> None:
    # A restarted connection (the next lifespan, the next test) begins as a fresh process's: it
    # keeps no books of, and relays nothing for, the rows of its earlier life.
    await sync_to_async(write)(1)
    assert outbox_rows.recorded_here()
    await asyncio.to_thread(connection.shutdown)
    assert not outbox_rows.recorded_here()
    assert realtime_nats.outbox.status()["outbox"] == 0


async def test_what_was_written_while_nats_was_down_reaches_the_stream_first_in_order(
    own_jetstream: NatsServer, acks: Acks, prefix: str
) -> None:
    before = await written_and_acked(acks, range(1, 4))
    await asyncio.to_thread(own_jetstream.stop)
    assert await asyncio.to_thread(connection.disconnected.wait, 15)
    during = [await sync_to_async(write)(v) for v in range(4, 24)]
    # `publish` only queues: once the pump is idle, every one of them took the fallback bus.
    assert await asyncio.to_thread(realtime_nats.outbox.wait_idle, 15)
    assert realtime_nats.status()["fallback"] >= len(during)
    await asyncio.to_thread(own_jetstream.start)
    assert await asyncio.to_thread(connection.connected.wait, 20)
    after = [await sync_to_async(write)(v) for v in range(24, 27)]
    await asyncio.to_thread(acks.wait_for, before + during + after)
    stored = await stream_rates(own_jetstream, prefix)
    # Every version once, in order: the relay went before the first event after the return.
    assert [version for _, _, version in stored] == list(range(1, 27))
    assert [event_id for _, event_id, _ in stored] == before + during + after
    assert realtime_nats.status()["relayed"] >= len(during)
    await wait_until(lambda: undelivered() == 0, "every row marked delivered")


async def test_a_relay_of_what_the_stream_already_holds_stores_nothing_twice(
    own_jetstream: NatsServer, acks: Acks, prefix: str
) -> None:
    sent = await written_and_acked(acks, range(1, 6))
    # As if the acks had been lost: the rows are undelivered again, and a new owner relays.
    await sync_to_async(OutboxEvent.objects.update)(delivered_at=None)
    first = dict(acks.seqs)
    acks.seqs.clear()
    realtime_nats.relay_undelivered()
    again = await asyncio.to_thread(acks.wait_for, sent)
    assert again == first  # each duplicate acknowledged with the sequence it was stored under
    assert [version for _, _, version in await stream_rates(own_jetstream, prefix)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    await wait_until(lambda: undelivered() == 0, "every row marked delivered")


async def test_undelivered_rows_of_another_prefix_are_not_relayed_and_hold_nothing(
    own_jetstream: NatsServer, acks: Acks, prefix: str
) -> None:
    """Rows written under another KURS_NATS_PREFIX (changed since, or another deployment on
    the same database) can never be stored by this prefix's stream: relaying them was refused
    on every round, and held every newer event behind the refusal."""
    foreign = [(uuid.uuid4().hex, f"other{prefix}.rates.updated.BTC-USD", "{}") for _ in range(3)]
    await sync_to_async(outbox_rows.record)(foreign)
    sent = await written_and_acked(acks, range(1, 4))
    realtime_nats.relay_undelivered()
    sent += await written_and_acked(acks, range(4, 6))
    assert [version for _, _, version in await stream_rates(own_jetstream, prefix)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    await wait_until(lambda: undelivered() == len(foreign), "this prefix's rows delivered")
    assert not set(acks.seqs) & {event_id for event_id, _, _ in foreign}
    # Never sent: nothing refused (their subjects are no stream's), nothing held, no fallback.
    status = realtime_nats.status()
    assert (status["last_error"], status["fallback"]) == (None, 0)


async def test_the_stream_is_reconciled_with_the_configuration_at_start_up(
    own_jetstream: NatsServer, prefix: str
) -> None:
    client = await nats.connect(own_jetstream.url)
    js = client.jetstream()
    name = stream_name(prefix)
    await js.add_stream(
        StreamConfig(name=name, subjects=[f"{prefix}.rates.>"], max_age=60, duplicate_window=5)
    )
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15)
    info = await js.stream_info(name)
    await client.close()
    config: Any = info.config
    assert (config.max_age, config.duplicate_window, config.num_replicas) == (
        STREAM_MAX_AGE_S,
        STREAM_DUPLICATE_WINDOW_S,
        1,
    )
    assert config.subjects == event_subjects(prefix)


async def test_more_replicas_than_the_server_has_leave_it_without_stream_and_say_so(
    own_jetstream: NatsServer, settings: Any
) -> None:
    settings.KURS_NATS_REPLICAS = 3
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15)
    status = realtime_nats.status()
    assert status["jetstream"] is False
    assert "JetStream stream" in (status["last_error"] or "")


@contextlib.asynccontextmanager
async def a_full_stream(server: NatsServer, prefix: str) -> AsyncIterator[None]:
    """The stream made again by hand holding one message at most, discarding new ones, and
    full (a `provider.state` named "filler"): JetStream refuses every event, for a reason the
    outbox cannot mend, until the stream takes any number again on leaving the block."""
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        name = stream_name(prefix)
        config = (await js.stream_info(name)).config
        await js.delete_stream(name)
        config.max_msgs, config.discard = 1, DiscardPolicy.NEW
        await js.add_stream(config)
        filler = json.dumps({"data": {"name": "filler"}}).encode()
        await js.publish(f"{prefix}.provider.state", filler)
        yield
        config.max_msgs = -1
        await js.update_stream(config)
    finally:
        await client.close()


async def test_an_event_the_stream_refused_reaches_it_before_any_newer_one(
    own_jetstream: NatsServer, acks: Acks, prefix: str
) -> None:
    """As when a replicated stream loses its leader: publishes are refused until another is
    elected, then accepted (here a stream that is full, discarding new messages, until it is
    not: one the outbox cannot make again). What was refused goes first; what is written
    meanwhile waits behind it (make test-cluster found clients missing versions a relay stored
    after newer ones)."""
    await written_and_acked(acks, range(1, 3))
    # Booked delivered first: a relay would store them again in the stream made anew below.
    await wait_until(lambda: undelivered() == 0, "the first rows marked delivered")
    async with a_full_stream(own_jetstream, prefix):
        refused = [await sync_to_async(write)(v) for v in (3, 4)]
        await wait_until(
            lambda: refused[-1] in (realtime_nats.status()["last_error"] or ""), "a refused ack"
        )
    # It takes events again, as a stream with a new leader does.
    newer = [await sync_to_async(write)(v) for v in (5, 6)]
    await asyncio.to_thread(acks.wait_for, refused + newer)
    stored = await stream_rates(own_jetstream, prefix)
    assert [version for _, _, version in stored] == [3, 4, 5, 6]
    await wait_until(lambda: undelivered() == 0, "every row marked delivered")


def write_named(name: str) -> str:
    """One stored event in its own transaction (a `provider.state` named `name`): its id.
    Every socket gets it, and the bridge hands each one on (no version to drop it by)."""
    with transaction.atomic():
        event_id = events.publish_on_commit(
            "provider.state", {"name": name, "state": "closed", "reason": ""}
        )
    assert event_id is not None
    return event_id


@dataclass
class Frames:
    """The `provider.state` frames a socket received: (seq, name); seq None: the fallback bus."""

    got: list[tuple[int | None, str]] = field(default_factory=list)

    async def read(self, ws: WebsocketCommunicator) -> None:
        while True:
            frame = json.loads(await ws.receive_from(60))
            if frame["type"] == "provider.state":
                self.got.append((frame.get("seq"), frame["data"]["name"]))

    def names(self, *, numbered: bool = False) -> list[str]:
        return [name for seq, name in self.got if seq is not None or not numbered]


async def stream_names(server: NatsServer, prefix: str) -> list[str]:
    """The names of the `provider.state` events the stream holds, in its order."""
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        name = stream_name(prefix)
        state = (await js.stream_info(name)).state
        names = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await js.get_msg(name, seq)
            if msg.subject == f"{prefix}.provider.state" and msg.data:
                names.append(json.loads(msg.data)["data"]["name"])
        return names
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def reading_socket() -> AsyncIterator[Frames]:
    """The bridge consuming the stream and a socket whose frames are read meanwhile."""
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15)
    await bridge.ensure_started()
    await wait_until(lambda: stream_consumer.consuming_stream, "the ordered consumer made")
    ws = await connect("/ws/items")
    frames = Frames()
    reader = None
    try:
        assert (await receive(ws))["type"] == "snapshot"
        reader = asyncio.create_task(frames.read(ws))
        yield frames
    finally:
        if reader is not None:
            reader.cancel()
        await ws.disconnect()


async def write_every(names: list[str], every: float = 0.05) -> list[str]:
    ids = []
    for name in names:
        ids.append(await sync_to_async(write_named)(name))
        await asyncio.sleep(every)
    return ids


async def test_a_deleted_stream_is_made_again_and_live_events_resume_numbered(
    own_jetstream: NatsServer, acks: Acks, prefix: str
) -> None:
    """An operator deletes the stream (as a NATS restarted with an empty store would lose it)
    while the outbox publishes an event every 50 ms: JetStream refuses or drops what follows.
    The outbox makes the stream again and relays what it had not seen acknowledged; the
    bridge's consumer reads the new stream from its start. The socket gets every event, in the
    order written, all from the stream (numbered: the held ones waited for the new stream), and
    the new stream holds, once and in order, every event from the first one the old stream's
    loss left unbooked (at the latest the first written after the deletion) to the last."""
    names = [f"e{n}" for n in range(80)]
    async with reading_socket() as frames:
        writing = asyncio.create_task(write_every(names))
        await wait_until(lambda: len(frames.names()) >= 15, "15 events on the socket")
        client = await nats.connect(own_jetstream.url)
        await client.jetstream().delete_stream(stream_name(prefix))
        await client.close()
        ids = await writing
        seqs = await asyncio.to_thread(acks.wait_for, ids)
        await wait_until(lambda: list(dict.fromkeys(frames.names())) == names, "every event live")
    assert frames.names(numbered=True) == frames.names()  # none over the fallback bus
    stored = await stream_names(own_jetstream, prefix)
    first = names.index(stored[0])
    assert stored == names[first:], "a contiguous run of the events, each once, in order"
    # What the new stream lacks, the old one had stored before it was deleted: acknowledged
    # with the old stream's numbers (e0 as 1, e1 as 2, ...), so nothing written is lost. (The
    # socket's count at the deletion is no measure of this: an event the old stream stored just
    # before the deletion may reach the socket just after it.)
    assert first >= 15, "the deletion came after the first 15 events reached the socket"
    assert [seqs[event_id] for event_id in ids[:first]] == list(range(1, first + 1))
    await wait_until(lambda: undelivered() == 0, "every row marked delivered")


async def test_events_held_past_the_limit_go_live_and_reach_the_stream_in_order_later(
    own_jetstream: NatsServer, acks: Acks, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JetStream refuses for a reason the outbox cannot mend (here a stream an operator made
    full, discarding new messages): after HOLD_LIMIT_S newer events go live over the fallback
    bus rather than wait; once the stream takes events again the relay stores every one, once,
    in the order written."""
    monkeypatch.setattr(publishing, "HOLD_LIMIT_S", 1.0)
    async with reading_socket() as frames:
        names = [f"a{n}" for n in range(40)]
        async with a_full_stream(own_jetstream, prefix):
            after = await write_every(names)
            # Live over the fallback bus (unnumbered), in the order written, while refused.
            await wait_until(lambda: frames.names() == names, "every event live")
            assert not acks.seqs.keys() & set(after)
        await asyncio.to_thread(acks.wait_for, after, 30)
        assert await stream_names(own_jetstream, prefix) == ["filler", *names]
        # New events go on NATS again, from the stream (numbered).
        await asyncio.to_thread(acks.wait_for, await write_every(["z"]))
        await wait_until(lambda: "z" in frames.names(numbered=True), "z from the stream")
    await wait_until(lambda: undelivered() == 0, "every row marked delivered")
