"""Sequence numbers and lossless resume (`seq` and `since` in docs/events.md).

Against a real NATS with JetStream: the machine's (`machine_nats`) and one this test restarts
(`own_jetstream`, its stream kept on disk). A client reads some events, goes away, 500 events are
published across the eight pairs, and it comes back with its last `seq`: it must get exactly the
events of its pairs it missed, in order, then live ones.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from decimal import Decimal
from typing import Any

import httpx
import nats
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from items.models import Item
from realtime import events
from realtime import nats as realtime_nats
from realtime.bridge import bridge
from realtime.nats import connection, stream_consumer, stream_name
from realtime.nats.stream import StreamConsumer, StreamCursor, StreamMadeAnew
from realtime.tests.conftest import connect, receive, receive_until
from realtime.tests.test_sse import next_event, sse_events
from tests.services import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True)]

PAIRS = [
    f"{base}-{quote}" for base in ("BTC", "ETH", "USDTTRC", "USDTERC") for quote in ("RUB", "USD")
]
MINE = ["BTC-USD", "ETH-RUB"]
MISSED = 500


def rate(direction: str, value: int) -> dict[str, object]:
    return {
        "direction": direction,
        "value": Decimal(value),
        "provider": "binance",
        "source_time": "2026-11-23T06:00:00Z",
        "checked_at": "2026-11-23T06:00:00Z",
        "status": "live",
        "derived": False,
        "route": None,
        "version": value,
    }


async def wait_for(flag: threading.Event, wait: float = 15.0) -> bool:
    return await asyncio.to_thread(flag.wait, wait)


@pytest.fixture
async def eight_pairs() -> None:
    for pair in PAIRS:
        base, quote = pair.split("-")
        await sync_to_async(Item.objects.get_or_create)(base=base, quote=quote)


async def started() -> None:
    """The bridge running and reading the stream through its ordered consumer."""
    await bridge.ensure_started()
    assert await wait_for(connection.connected)
    assert stream_consumer.consuming_stream


def publish_rates(count: int, start: int) -> list[tuple[str, int]]:
    """`count` rate events round-robin over the eight pairs, values from `start`: what went."""
    sent = []
    for value, pair in zip(range(start, start + count), itertools.cycle(PAIRS), strict=False):
        events.publish("rate.updated", rate(pair, value))
        sent.append((pair, value))
    return sent


def publish_marker(name: str) -> None:
    events.publish("provider.state", {"name": name, "state": "closed", "reason": ""})


async def until_marker(ws: WebsocketCommunicator, name: str) -> list[dict[str, Any]]:
    """Every event up to the `provider.state` marker `name` (ticks left out)."""
    got = []
    while True:
        message = await receive(ws, wait=10)
        if message["type"] == "tick":
            continue
        got.append(message)
        if message["type"] == "provider.state" and message["data"]["name"] == name:
            return got


def mine(sent: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(pair, value) for pair, value in sent if pair in MINE]


def rates_of(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [
        (f["data"]["direction"], f["data"]["value"]) for f in frames if f["type"] == "rate.updated"
    ]


def assert_in_order_once(frames: list[dict[str, Any]]) -> None:
    seqs = [f["seq"] for f in frames]
    assert all(isinstance(seq, int) for seq in seqs)
    assert seqs == sorted(set(seqs)), "sequences repeat or go backwards"


def assert_coalesced(got: list[tuple[str, int]], expected: list[tuple[str, int]]) -> None:
    """Live updates of a pair may coalesce while a client is behind (the latest wins): what
    arrives is the sent list with at most some superseded values left out; never a duplicate,
    never out of order, and each pair's latest value always arrives."""
    iterator = iter(expected)
    assert all(item in iterator for item in got), f"out of order or unknown: {got} vs {expected}"
    for pair in MINE:
        assert [v for p, v in got if p == pair][-1] == [v for p, v in expected if p == pair][-1]


async def read_some_then_leave(eight_pairs: None) -> int:
    """A client on two pairs reads a few events and disconnects: its last seq."""
    ws = await connect(f"/ws/items?pairs={','.join(MINE)}")
    snapshot = await receive(ws)
    assert snapshot["type"] == "snapshot"
    assert isinstance(snapshot["seq"], int)
    sent = publish_rates(16, start=1)
    publish_marker("before")
    frames = await until_marker(ws, "before")
    assert_coalesced(rates_of(frames), mine(sent))
    assert_in_order_once(frames)
    assert frames[0]["seq"] > snapshot["seq"]
    await ws.disconnect()
    return int(frames[-1]["seq"])


async def resume_and_check(last_seq: int, sent: list[tuple[str, int]], markers: list[str]) -> None:
    ws = await connect(f"/ws/items?pairs={','.join(MINE)}&since={last_seq}")
    frames = await until_marker(ws, "after")
    # No snapshot: the replay brings the client's state up to date, event by event; provider
    # events go to every subscription, so the markers published meanwhile are among them.
    assert {f["type"] for f in frames} == {"rate.updated", "provider.state"}
    names = [f["data"]["name"] for f in frames if f["type"] == "provider.state"]
    assert names == [*markers, "after"]
    assert rates_of(frames) == mine(sent)
    assert len(rates_of(frames)) == len(mine(sent)) > MISSED // 4 - 4
    assert_in_order_once(frames)
    assert frames[0]["seq"] > last_seq
    # Then live, still numbered.
    events.publish("rate.updated", rate("BTC-USD", 10_000))
    live = await receive_until(ws, "rate.updated", wait=10)
    assert (live["data"]["value"], live["seq"] > frames[-1]["seq"]) == (10_000, True)
    await ws.disconnect()


async def observe_all(name: str) -> None:
    """Wait until this process's bridge has handed every event up to the marker to the hub."""
    observer = await connect("/ws/items")
    await receive(observer)
    publish_marker(name)
    await until_marker(observer, name)
    await observer.disconnect()


async def test_every_frame_after_the_snapshot_carries_the_stream_sequence(
    machine_nats: str, eight_pairs: None, prefix: str
) -> None:
    await started()
    ws = await connect("/ws/items")
    snapshot = await receive(ws)
    publish_rates(3, start=1)
    events.publish("item.updated", {"id": 1, "code": "BTC-USD", "is_active": True})
    publish_marker("end")
    frames = await until_marker(ws, "end")
    assert [f["type"] for f in frames] == ["rate.updated"] * 3 + ["item.updated", "provider.state"]
    assert_in_order_once(frames)
    client = await nats.connect(machine_nats)
    info = await client.jetstream().stream_info(stream_name(prefix))
    await client.close()
    # The stream's own numbers: the last frame is the stream's last message.
    assert frames[-1]["seq"] == info.state.last_seq
    assert snapshot["seq"] < frames[0]["seq"]
    # A new snapshot reflects everything so far.
    later = await connect("/ws/items")
    assert (await receive(later))["seq"] == info.state.last_seq
    await ws.disconnect()
    await later.disconnect()


async def test_a_client_that_comes_back_gets_exactly_the_events_it_missed(
    machine_nats: str, eight_pairs: None
) -> None:
    await started()
    last_seq = await read_some_then_leave(eight_pairs)
    sent = publish_rates(MISSED, start=100)
    await observe_all("seen")
    publish_marker("after")
    await resume_and_check(last_seq, sent, ["seen"])


async def test_a_client_that_comes_back_while_events_flow_loses_none(
    machine_nats: str, eight_pairs: None
) -> None:
    """The hand-over: events keep coming while the replay runs; none twice, none missing."""
    await started()
    last_seq = await read_some_then_leave(eight_pairs)
    sent = publish_rates(MISSED // 2, start=100)
    publisher = asyncio.get_running_loop().run_in_executor(
        None, lambda: publish_rates(MISSED // 2, start=100 + MISSED // 2)
    )
    ws = await connect(f"/ws/items?pairs={','.join(MINE)}&since={last_seq}")
    sent += await publisher
    publish_marker("after")
    frames = await until_marker(ws, "after")
    assert_in_order_once(frames)
    assert_coalesced(rates_of(frames), mine(sent))
    await ws.disconnect()


async def test_a_client_that_comes_back_through_a_nats_restart_gets_exactly_what_it_missed(
    own_jetstream: NatsServer, eight_pairs: None
) -> None:
    await started()
    last_seq = await read_some_then_leave(eight_pairs)
    sent = publish_rates(MISSED // 5, start=100)
    await observe_all("before-restart")
    await asyncio.to_thread(own_jetstream.stop)
    assert await wait_for(connection.disconnected)
    await asyncio.to_thread(own_jetstream.start)
    assert await wait_for(connection.connected, 20)
    assert stream_consumer.consuming_stream
    sent += publish_rates(MISSED - len(sent), start=100 + len(sent))
    # The live consumer was made again after the restart: the bridge sees the new events.
    await observe_all("after-restart")
    publish_marker("after")
    await resume_and_check(last_seq, sent, ["before-restart", "after-restart"])
    assert realtime_nats.status()["jetstream"] is True


async def test_a_client_resuming_before_the_live_consumer_exists_loses_nothing(
    machine_nats: str, eight_pairs: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web process whose ordered consumer is made late (in a cluster, the stream electing
    its leader: nothing a single server can be made to do, so the refusal is injected) serves
    a resuming client meanwhile. The consumer then starts from the stream's end at that later
    moment; the client must still get the events between its replay's end and that start."""
    await started()
    last_seq = await read_some_then_leave(eight_pairs)
    await bridge.stop()
    refusing = threading.Event()
    refusing.set()
    make = StreamConsumer._subscribe_ordered

    async def no_leader_yet(self: StreamConsumer, *args: Any) -> None:
        if refusing.is_set():
            raise RuntimeError("no stream leader (injected)")
        await make(self, *args)

    monkeypatch.setattr(StreamConsumer, "_subscribe_ordered", no_leader_yet)
    await bridge.ensure_started()
    assert not stream_consumer.consuming_stream
    sent = publish_rates(40, start=100)
    publish_marker("replayed")
    assert await asyncio.to_thread(realtime_nats.outbox.wait_idle, 15)
    ws = await connect(f"/ws/items?pairs={','.join(MINE)}&since={last_seq}")
    frames = await until_marker(ws, "replayed")
    # Written after the replay's read: in the stream, seen by no live consumer yet.
    sent += publish_rates(40, start=200)
    assert await asyncio.to_thread(realtime_nats.outbox.wait_idle, 15)
    assert not stream_consumer.consuming_stream
    refusing.clear()  # the leader is elected: the consumer is made, from the stream's end
    assert await wait_for_consumer()
    publish_marker("after")
    frames += await until_marker(ws, "after")
    assert [f["data"]["name"] for f in frames if f["type"] == "provider.state"] == [
        "replayed",
        "after",
    ]
    assert rates_of(frames) == mine(sent)
    assert_in_order_once(frames)
    await ws.disconnect()


async def wait_for_consumer(within: float = 15.0) -> bool:
    """The bridge's ordered consumer made (it is retried every CONSUMER_RETRY_S)."""
    deadline = asyncio.get_running_loop().time() + within
    while not stream_consumer.consuming_stream:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_since_older_than_the_stream_gets_a_gap_and_a_fresh_snapshot(
    machine_nats: str, eight_pairs: None, prefix: str
) -> None:
    await started()
    publish_rates(8, start=1)
    await observe_all("filled")
    client = await nats.connect(machine_nats)
    js = client.jetstream()
    await js.purge_stream(stream_name(prefix))
    first = (await js.stream_info(stream_name(prefix))).state.first_seq
    await client.close()
    ws = await connect("/ws/items?pairs=BTC-USD&since=1")
    gap = await receive(ws)
    assert (gap["type"], gap["data"]) == ("gap", {"since": 1, "first_available": first})
    snapshot = await receive(ws)
    assert snapshot["type"] == "snapshot"
    assert snapshot["data"]["pairs"] == ["BTC-USD"]
    assert [c["value"] for c in snapshot["data"]["courses"]] == [2]  # BTC-USD went second
    assert snapshot["seq"] == first - 1
    events.publish("rate.updated", rate("BTC-USD", 77))
    live = await receive_until(ws, "rate.updated")
    assert (live["data"]["value"], live["seq"]) == (77, first)
    await ws.disconnect()


async def test_a_since_beyond_the_stream_or_malformed_is_answered_not_ignored(
    machine_nats: str, eight_pairs: None
) -> None:
    await started()
    ahead = await connect("/ws/items?since=999999999")
    gap = await receive(ahead)
    assert gap["type"] == "gap"
    assert (await receive(ahead))["type"] == "snapshot"
    await ahead.disconnect()
    publish_rates(8, start=1)
    await observe_all("filled")
    # Not a resume then: a snapshot (the whole state), never a replay that could be of another
    # stream than the client's.
    for query, detail in (
        ("since=yesterday", "since: expected a stream sequence (a whole number >= 0)"),
        (
            "since=1&epoch=Not%20One",
            "epoch: expected a stream epoch (the epoch of a snapshot or gap frame)",
        ),
    ):
        bad = await connect(f"/ws/items?{query}")
        assert (await receive(bad))["type"] == "snapshot"
        assert await receive(bad) == {"type": "error", "detail": detail}
        await bad.disconnect()


async def test_without_jetstream_a_resume_says_so_and_frames_have_no_seq(
    own_nats: NatsServer, eight_pairs: None
) -> None:
    await bridge.ensure_started()
    assert await wait_for(connection.connected)
    assert not stream_consumer.consuming_stream
    ws = await connect("/ws/items?pairs=BTC-USD&since=5")
    gap = await receive(ws)
    assert (gap["type"], gap["data"]) == ("gap", {"since": 5, "first_available": None})
    snapshot = await receive(ws)
    assert snapshot["type"] == "snapshot"
    assert "seq" not in snapshot
    events.publish("rate.updated", rate("BTC-USD", 5))
    live = await receive_until(ws, "rate.updated")
    assert "seq" not in live
    await ws.disconnect()


async def test_a_stream_made_anew_after_a_restart_is_followed_from_its_start(
    own_jetstream: NatsServer, eight_pairs: None, tmp_path: Any
) -> None:
    await started()
    ws = await connect("/ws/items?pairs=BTC-USD")
    await receive(ws)
    publish_rates(16, start=1)
    before = await receive_until(ws, "rate.updated", wait=10)
    assert before["seq"] > 1
    await asyncio.to_thread(own_jetstream.stop)
    assert await wait_for(connection.disconnected)
    own_jetstream.store_dir = tmp_path / "empty-store"  # the stream and its numbers are gone
    await asyncio.to_thread(own_jetstream.start)
    assert await wait_for(connection.connected, 20)
    events.publish("rate.updated", rate("BTC-USD", 500))
    after = await receive_until(ws, "rate.updated", wait=10)
    while after["data"]["value"] != 500:  # updates of the first batch still on their way
        after = await receive_until(ws, "rate.updated", wait=10)
    assert after["seq"] == 1
    fresh = await connect("/ws/items?pairs=BTC-USD")
    assert (await receive(fresh))["seq"] == 1
    await fresh.disconnect()
    await ws.disconnect()


async def test_a_seq_of_a_stream_made_anew_resumes_with_its_epoch_to_a_gap_not_other_events(
    own_jetstream: NatsServer, eight_pairs: None, tmp_path: Any, asgi_server: int
) -> None:
    """The new stream's numbers pass the client's old `seq`: with the epoch it read it in, the
    client gets `gap` and a snapshot (on the socket and the SSE stream); without, `since` keeps
    its meaning, a sequence of the current stream (docs/events.md#resume-without-loss)."""
    await started()
    watch = await connect("/ws/items")  # stays across the restart: sees the new stream
    await receive(watch)
    ws = await connect("/ws/items?pairs=BTC-USD")
    old_epoch = (await receive(ws))["epoch"]
    assert isinstance(old_epoch, str)
    publish_rates(16, start=1)
    publish_marker("before")
    last_seq = (await until_marker(ws, "before"))[-1]["seq"]
    await ws.disconnect()
    await asyncio.to_thread(own_jetstream.stop)
    assert await wait_for(connection.disconnected)
    own_jetstream.store_dir = tmp_path / "empty-store"  # the stream and its numbers are gone
    await asyncio.to_thread(own_jetstream.start)
    assert await wait_for(connection.connected, 20)
    sent = publish_rates(last_seq + 8, start=1000)
    publish_marker("after")
    end = (await until_marker(watch, "after"))[-1]["seq"]
    assert end > last_seq + 8  # the new stream holds other events under the client's numbers
    btc = [value for pair, value in sent if pair == "BTC-USD"]

    resumed = await connect(f"/ws/items?pairs=BTC-USD&since={last_seq}&epoch={old_epoch}")
    gap = await receive(resumed)
    assert (gap["type"], gap["data"]) == ("gap", {"since": last_seq, "first_available": 1})
    new_epoch = gap["epoch"]
    assert isinstance(new_epoch, str)
    assert new_epoch != old_epoch
    snapshot = await receive(resumed)
    assert snapshot["type"] == "snapshot"
    assert (snapshot["seq"], snapshot["epoch"]) == (end, new_epoch)
    assert [c["value"] for c in snapshot["data"]["courses"]] == [btc[-1]]
    publish_marker("resumed")
    assert [f["type"] for f in await until_marker(resumed, "resumed")] == ["provider.state"]
    await resumed.disconnect()

    # The same on the SSE stream, the epoch beside Last-Event-ID.
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{asgi_server}", timeout=10) as http,
        http.stream(
            "GET",
            f"/api/v1/stream?pairs=BTC-USD&epoch={old_epoch}",
            headers={"Last-Event-ID": str(last_seq)},
        ) as response,
    ):
        stream = sse_events(response)
        sse_gap = (await next_event(stream, "gap")).json
        assert (sse_gap["data"], sse_gap["epoch"]) == (
            {"since": last_seq, "first_available": 1},
            new_epoch,
        )
        sse_snapshot = await anext(stream)
        assert (sse_snapshot.event, sse_snapshot.id) == ("snapshot", str(end + 1))
        assert sse_snapshot.json["epoch"] == new_epoch

    # With the new stream's epoch, a `since` of it replays (the sequences are its own).
    again = await connect(f"/ws/items?pairs=BTC-USD&since={last_seq}&epoch={new_epoch}")
    replayed = await receive(again)
    assert replayed["type"] == "rate.updated"
    assert replayed["seq"] > last_seq
    await again.disconnect()
    # Without an epoch, `since` means a sequence of the current stream, as before epochs: a
    # client of the old stream that sends none is replayed the new stream after that number.
    bare = await connect(f"/ws/items?pairs=BTC-USD&since={last_seq}")
    assert (await receive(bare)) == replayed
    await bare.disconnect()
    await watch.disconnect()


async def test_with_jetstream_foreign_messages_still_arrive_once_without_seq(
    machine_nats: str, eight_pairs: None, prefix: str
) -> None:
    await started()
    ws = await connect("/ws/items?pairs=BTC-USD")
    await receive(ws)
    client = await nats.connect(machine_nats)
    # Outside the stream's event families: the plain subscription relays it, unnumbered.
    await client.publish(f"{prefix}.weather", b'{"sky": "clear"}')
    # Inside them but foreign (no Kurs-Origin): numbered, like every stored message.
    await client.publish(f"{prefix}.provider.state", b'{"note": "from elsewhere"}')
    await client.flush()
    await client.close()
    publish_marker("end")
    frames = await until_marker(ws, "end")
    # Two subscriptions: the unnumbered one may overtake the consumer, or not.
    inbound = {f["data"]["subject"]: f for f in frames if f["type"] == "nats.inbound"}
    assert len(frames) == 3
    assert set(inbound) == {f"{prefix}.weather", f"{prefix}.provider.state"}
    assert "seq" not in inbound[f"{prefix}.weather"]
    assert frames[-1]["seq"] == inbound[f"{prefix}.provider.state"]["seq"] + 1
    await ws.disconnect()


async def test_a_replay_whose_stream_is_made_anew_midway_breaks_off(
    machine_nats: str, eight_pairs: None, prefix: str
) -> None:
    """A cursor that must open the stream again (its consumer gone with the old stream) finds
    another incarnation: it gives up rather than read the new one's messages as the old's."""
    await started()
    publish_rates(8, start=1)
    await observe_all("filled")
    cursor = StreamCursor(0)
    await cursor.open()
    assert cursor.epoch is not None
    client = await nats.connect(machine_nats)
    js = client.jetstream()
    config = (await js.stream_info(stream_name(prefix))).config
    await js.delete_stream(stream_name(prefix))
    await js.add_stream(config)
    for n in range(12):
        await js.publish(f"{prefix}.fetch.completed", f'{{"n": {n}}}'.encode())
    await client.close()

    async def read_to_the_end() -> None:
        while not cursor.done:
            await cursor.batch()

    try:
        with pytest.raises(StreamMadeAnew):
            await read_to_the_end()
    finally:
        await cursor.close()
