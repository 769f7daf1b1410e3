"""No lost event (docs/events.md#no-lost-event), end to end over real processes.

A fetcher (`run_fetch --watch`) and a uvicorn web process share a SQLite file and a nats-server
with JetStream that the test stops and starts; the emulator in this process moves prices every
second. Checked: clients that resume by `seq` after a NATS outage get every version of every
pair, in order, once; and events committed by an owner that was SIGKILLed before it could
publish them reach the stream when the next owner takes over.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.js.errors import NotFoundError

from rates.emulator import EmulatorServer, run_emulator_server
from realtime.nats import event_subjects, stream_name
from tests.outage import outage_round
from tests.services import ROOT, NatsServer, free_port
from tests.stack import Stack, wait_until

pytestmark = [pytest.mark.nats, pytest.mark.timeout(240)]


@pytest_asyncio.fixture
async def moving_emulator() -> AsyncIterator[EmulatorServer]:
    """Prices move every second."""
    async with run_emulator_server(host="127.0.0.1", port=0, tick=1.0, seed=11) as server:
        yield server


@pytest.fixture
def jetstream(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(port=free_port(), store_dir=tmp_path / "jetstream")
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def stack(
    tmp_path: Path, moving_emulator: EmulatorServer, jetstream: NatsServer
) -> AsyncIterator[Stack]:
    built = Stack(folder=tmp_path, emulator=moving_emulator, nats_url=jetstream.url, poll=1.0)
    await asyncio.to_thread(built.migrate)
    try:
        yield built
    finally:
        await asyncio.to_thread(built.stop)


async def test_clients_resuming_after_a_nats_outage_get_every_version_in_order(
    stack: Stack, jetstream: NatsServer
) -> None:
    stack.fetcher()
    web = stack.web()
    result = await outage_round(stack, web, jetstream, outage_s=3.0, min_moved=3)
    assert result.moved >= 6, "rates did not move while NATS was down"
    for client, verdict in result.verdicts.items():
        assert (verdict.lost, verdict.duplicates, verdict.out_of_order, verdict.gaps) == (
            0,
            0,
            0,
            0,
        ), f"{client}: {verdict}"
        assert verdict.received == verdict.expected > 0


# Three committed rate changes whose events never leave: the process is SIGKILLed by the first
# on-commit callback, before the events' own (registered after it) could hand them over.
KILLED_WRITER = """
import os, signal
from decimal import Decimal
import django
django.setup()
from django.db import transaction
from django.utils import timezone
from rates import services
from rates.providers import Quote

with transaction.atomic():
    transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
    for value in ("100", "101", "102"):
        now = timezone.now()
        services.accept_quote(Quote("binance", "BTC-USD", Decimal(value), now))
print("not killed")
"""


async def test_events_of_an_owner_killed_between_commit_and_publish_are_relayed_by_the_next(
    stack: Stack,
) -> None:
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WRITER,
        cwd=ROOT,
        env=stack.env("killed-writer"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await writer.communicate()
    assert writer.returncode == -9, output.decode(errors="replace")
    # Committed, and nothing on the stream.
    assert stack.query("SELECT version FROM rates_currentrate") == [(3,)]
    # The dead owner's rows (the next owner writes rows of its own all the time).
    undelivered = "SELECT COUNT(*) FROM realtime_outboxevent WHERE delivered_at IS NULL AND id <= 3"
    assert stack.query(undelivered) == [(3,)]
    client = await nats.connect(stack.nats_url)
    js = client.jetstream()
    name = stream_name(stack.prefix)
    with pytest.raises(NotFoundError):
        await js.stream_info(name)  # no event reached NATS: nobody even made the stream
    # Made here, so that this test reads it from its first message (the fetcher reconciles it).
    await js.add_stream(name=name, subjects=event_subjects(stack.prefix))
    sub = await js.subscribe(f"{stack.prefix}.rates.BTC-USD", ordered_consumer=True)

    stack.fetcher("next-owner")  # takes the lease, relays, then owns live rates
    versions = [
        json.loads((await sub.next_msg(timeout=60)).data)["data"]["version"] for _ in range(3)
    ]
    await client.close()
    # The dead owner's events, first, in order, once.
    assert versions == [1, 2, 3]
    await wait_until(
        lambda: stack.query(undelivered) == [(0,)], within=30, what="rows marked delivered"
    )
