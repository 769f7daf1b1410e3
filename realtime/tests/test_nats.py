"""The NATS transport and the bridge against real servers over loopback.

`machine_nats` is the machine's server with JetStream (127.0.0.1:4222); `own_nats` is a plain
nats-server (no JetStream) that the test starts, stops and restarts on a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import nats
import pytest
from asgiref.sync import sync_to_async
from django.conf import LazySettings
from nats.aio.client import Client
from nats.aio.msg import Msg

from items.models import Item
from realtime import events
from realtime import nats as realtime_nats
from realtime.nats import connection, stream_consumer, stream_name
from realtime.tests.conftest import connect, receive, receive_until
from tests.services import NatsServer, run_python

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True)]


def rate(direction: str, value: str) -> dict[str, object]:
    return {
        "direction": direction,
        "value": Decimal(value),
        "provider": "binance",
        "source_time": "2026-11-23T06:00:00Z",
        "derived": False,
    }


@pytest.fixture
async def peer(settings: LazySettings) -> AsyncIterator[Client]:
    """Another service on the same NATS: a plain nats-py client."""
    client = await nats.connect(settings.NATS_SERVERS, name="kurs-test-peer")
    yield client
    await client.drain()


async def collect(peer: Client, subject: str) -> asyncio.Queue[Msg]:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        await queue.put(msg)

    await peer.subscribe(subject, cb=on_message)
    await peer.flush()
    return queue


async def connected(wait: float = 10.0) -> bool:
    return await asyncio.to_thread(realtime_nats.wait_connected, wait)


async def wait_for(flag: threading.Event, wait: float = 10.0) -> bool:
    return await asyncio.to_thread(flag.wait, wait)


async def test_publish_sends_the_envelope_with_the_origin_header(
    machine_nats: str, peer: Client, prefix: str, settings: LazySettings
) -> None:
    queue = await collect(peer, f"{prefix}.>")
    assert await connected()
    envelope = events.publish("rate.updated", rate("BTC-USD", "54000.000123"))
    msg = await asyncio.wait_for(queue.get(), 5)
    assert msg.subject == f"{prefix}.rates.BTC-USD"
    assert msg.headers is not None
    assert msg.headers["Kurs-Origin"] == settings.KURS_INSTANCE
    assert msg.headers["Nats-Msg-Id"] == envelope["id"]
    assert b'"value":54000.000123' in msg.data
    body = json.loads(msg.data)
    assert body["id"] == envelope["id"]
    assert body["type"] == "rate.updated"
    assert body["ts"].endswith("Z")
    status = realtime_nats.status()
    assert (status["status"], status["state"]) == ("ok", "connected")


async def test_it_ensures_the_jetstream_stream_where_the_server_has_it(
    machine_nats: str, peer: Client, prefix: str
) -> None:
    assert await connected()
    js = peer.jetstream()
    name = stream_name(prefix)
    assert await wait_for(connection.stream_checked)
    assert realtime_nats.status()["jetstream"] is True
    info = await js.stream_info(name)
    # Every event family, and not the owner's control requests (kurs.ctl.fetch).
    assert info.config.subjects == [
        f"{prefix}.items.>",
        f"{prefix}.rates.>",
        f"{prefix}.fetch.>",
        f"{prefix}.provider.>",
        f"{prefix}.peg.>",
        f"{prefix}.quotes.>",
    ]
    assert info.config.max_age == 24 * 3600
    events.publish("provider.state", {"name": "cbr", "state": "open", "reason": "timeout"})
    # Another service replays the stream from its start.
    replay = await js.subscribe(f"{prefix}.provider.state", ordered_consumer=True)
    replayed = await replay.next_msg(timeout=5)
    assert json.loads(replayed.data)["data"]["name"] == "cbr"
    await replay.unsubscribe()


async def test_a_server_without_jetstream_is_fine(own_nats: NatsServer, peer: Client) -> None:
    assert await connected()
    assert await wait_for(connection.stream_checked)
    assert realtime_nats.status()["jetstream"] is False
    assert realtime_nats.status()["status"] == "ok"


async def test_publish_works_from_sync_threads_and_from_async_code(
    own_nats: NatsServer, peer: Client, prefix: str
) -> None:
    queue = await collect(peer, f"{prefix}.fetch.completed")
    assert await connected()

    def from_a_thread(n: int) -> None:
        for i in range(n):
            events.publish("fetch.completed", {"stored": i, "providers": {}, "duration_ms": 1})

    threads = [threading.Thread(target=from_a_thread, args=(50,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for i in range(50):
        events.publish("fetch.completed", {"stored": i, "providers": {}, "duration_ms": 2})
    for thread in threads:
        thread.join()
    ids = set()
    for _ in range(250):
        ids.add(json.loads((await asyncio.wait_for(queue.get(), 5)).data)["id"])
    assert len(ids) == 250


async def test_the_bridge_relays_foreign_messages_and_drops_bad_ones(
    own_nats: NatsServer, peer: Client, prefix: str
) -> None:
    await sync_to_async(Item.objects.get_or_create)(base="BTC", quote="USD")
    ws = await connect("/ws/items?pairs=BTC-USD")
    await receive(ws)
    assert await connected()

    await peer.publish("items.updates", b'{"code": "BTC-USD", "note": "from a seed"}')
    inbound = await receive(ws)
    assert inbound["type"] == "nats.inbound"
    assert inbound["data"] == {
        "subject": "items.updates",
        "payload": {"code": "BTC-USD", "note": "from a seed"},
    }

    await peer.publish(f"{prefix}.custom", b"not json")
    await peer.publish(f"{prefix}.custom", b'{"big": "' + b"x" * (64 * 1024) + b'"}')
    await peer.publish(f"{prefix}.custom", b"[1, 2.50]")
    inbound = await receive(ws)
    # The two bad messages went first and never arrived.
    assert inbound["data"] == {"subject": f"{prefix}.custom", "payload": [1, 2.5]}

    # Another Kurs instance's event (it carries Kurs-Origin): handled as an event, not relayed.
    data = {**rate("BTC-USD", "1.5"), "value": 1.5}
    other = {"type": "rate.updated", "data": data, "ts": "2026-11-23T06:00:00Z", "id": "e1"}
    await peer.publish(
        f"{prefix}.rates.BTC-USD",
        json.dumps(other).encode(),
        headers={"Kurs-Origin": "fetcher-on-another-host"},
    )
    event = await receive(ws)
    assert (event["type"], event["data"]["value"]) == ("rate.updated", 1.5)
    # Header names are compared without case: another client library may lower-case them.
    data["value"] = 1.75
    await peer.publish(
        f"{prefix}.rates.BTC-USD",
        json.dumps({**other, "data": data, "id": "e2"}).encode(),
        headers={"kurs-origin": "a-go-service-relaying-kurs"},
    )
    event = await receive(ws)
    assert (event["type"], event["data"]["value"]) == ("rate.updated", 1.75)
    await ws.disconnect()


async def test_it_survives_a_nats_restart_mid_stream(own_nats: NatsServer, prefix: str) -> None:
    await sync_to_async(Item.objects.get_or_create)(base="ETH", quote="USD")
    ws = await connect("/ws/items?pairs=ETH-USD")
    await receive(ws)
    assert await connected()

    async def publish_and_receive(value: str) -> dict[str, Any]:
        events.publish("rate.updated", rate("ETH-USD", value))
        return await receive_until(ws, "rate.updated", wait=5)

    assert (await publish_and_receive("1"))["data"]["value"] == 1
    published_over_nats = realtime_nats.status()["published"]

    await asyncio.to_thread(own_nats.stop)
    assert await wait_for(connection.disconnected)
    assert realtime_nats.status()["status"] == "degraded"
    # NATS is down: the event still reaches the socket, over the fallback bus.
    assert (await publish_and_receive("2"))["data"]["value"] == 2
    assert realtime_nats.status()["fallback"] >= 1

    assert realtime_nats.status()["last_error"]
    await asyncio.to_thread(own_nats.start)
    assert await connected(15)
    assert realtime_nats.status()["status"] == "ok"
    assert realtime_nats.status()["last_error"] is None  # the outage is over
    assert (await publish_and_receive("3"))["data"]["value"] == 3
    assert realtime_nats.status()["published"] > published_over_nats
    await ws.send_to(text_data="ping")
    assert await receive_until(ws, "pong") == {"type": "pong"}
    await ws.disconnect()


async def test_shutdown_flushes_the_outbox_and_drains(
    own_nats: NatsServer, peer: Client, prefix: str
) -> None:
    queue = await collect(peer, f"{prefix}.provider.state")
    assert await connected()
    for i in range(200):
        events.publish("provider.state", {"name": "cbr", "state": "open", "reason": str(i)})
    # A management command ending right after it published: nothing queued may be lost.
    await asyncio.to_thread(connection.shutdown)
    reasons = [json.loads((await asyncio.wait_for(queue.get(), 5)).data) for _ in range(200)]
    assert [r["data"]["reason"] for r in reasons] == [str(i) for i in range(200)]
    assert realtime_nats.status()["state"] == "closed"


ONE_SHOT = """
import django
django.setup()
from realtime import events
# Published at once, while the first connection is still being made, then the process exits.
events.publish("fetch.completed", {"stored": 7, "providers": {}, "duration_ms": 1})
"""


async def test_a_one_shot_process_publishes_to_nats_not_to_its_dead_fallback(
    own_nats: NatsServer, peer: Client, prefix: str
) -> None:
    queue = await collect(peer, f"{prefix}.fetch.completed")
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.test_settings",
        "NATS_URL": own_nats.url,
        "KURS_NATS_PREFIX": prefix,
        "KURS_LOG_LEVEL": "INFO",
    }
    result = await asyncio.to_thread(run_python, ["-c", ONE_SHOT], environment)
    assert result.returncode == 0, result.stderr
    message = await asyncio.wait_for(queue.get(), 5)
    assert json.loads(message.data)["data"]["stored"] == 7
    assert "published 1, fallback 0" in result.stderr


async def tasks_on_the_connection_loop() -> set[asyncio.Task[object]]:
    """The tasks pending on the connection's loop, this probe excepted."""

    async def probe() -> set[asyncio.Task[object]]:
        return asyncio.all_tasks() - {asyncio.current_task()}

    return set(await connection.on_loop(probe()))


async def all_end(tasks: set[asyncio.Task[object]], wait: float = 5.0) -> bool:
    """Whether every one of `tasks` ends within `wait` (cancelled ones take a pass of the loop)."""

    async def ended() -> bool:
        if tasks:
            await asyncio.wait(tasks, timeout=wait)
        return all(task.done() for task in tasks)

    return bool(await connection.on_loop(ended()))


async def test_an_ordered_consumer_leaves_no_task_behind(
    own_jetstream: NatsServer, prefix: str
) -> None:
    # nats-py runs tasks of its own for an ordered consumer (heartbeat, flow control): ending the
    # consumer through its public unsubscribe, when it is re-made, stopped or shut down, ends them.
    async def ignore(msg: Msg, seq: int | None) -> None:
        return None

    def consume() -> asyncio.Future[None]:
        future = stream_consumer.consume(
            f"{prefix}.>", ignore, position=lambda: None, on_start=lambda seq, epoch: None
        )
        return asyncio.wrap_future(future)

    assert await connected()
    assert await wait_for(connection.stream_checked)
    before = await tasks_on_the_connection_loop()
    await consume()
    assert stream_consumer.consuming_stream
    first = await tasks_on_the_connection_loop() - before
    assert len(first) > 1  # more than the plain subscription's one task
    await consume()  # what a reconnection does: the consumer made anew
    assert await all_end(first)
    second = await tasks_on_the_connection_loop() - before
    assert len(second) == len(first)
    stopped = stream_consumer.stop_consuming()
    assert stopped is not None
    await asyncio.wrap_future(stopped)
    assert await all_end(second)
    assert await tasks_on_the_connection_loop() == before

    await consume()
    loop = connection.loop
    assert loop is not None
    # Shut down while the server is gone: unsubscribing cannot reach it, the loop still ends
    # every task it ran instead of leaving them pending.
    await asyncio.to_thread(own_jetstream.stop)
    assert await wait_for(connection.disconnected)
    await asyncio.to_thread(connection.shutdown)
    assert loop.is_closed()
    assert not asyncio.all_tasks(loop)


def test_the_nats_package_imports_before_django_is_set_up() -> None:
    """Scripts import `realtime.nats` before Django's apps are ready (tests/prod_stack.py,
    bench/bench_replay.py for `stream_name`): the outbox's model is looked up when first used."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = "import realtime.nats as n; print(n.stream_name.__module__)"
    done = run_python(["-c", code], env)
    assert (done.returncode, done.stdout.strip()) == (0, "realtime.nats.subjects"), done.stderr
