"""Sharded ownership end to end (docs/architecture.md#sharded-ownership): two real
`run_fetch --watch` processes with `KURS_OWNER_SHARDS=2` each own one shard, every pair is
served by its shard's owner, and after a SIGKILL the other takes the dead one's shard.

What is checked is what the database and NATS show: the lease rows, each pair's `rate.updated`
events (whose `Kurs-Origin` names the process that sent them), and the served log's versions.
Runs on SQLite and on PostgreSQL (a database of its own, dropped after).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from rates.emulator import EmulatorServer, run_emulator_server
from rates.shards import shard_of
from realtime.nats.subjects import stream_name
from tests.services import NATS_URL, POSTGRES_URL, require
from tests.stack import Stack, wait_until

pytestmark = [pytest.mark.nats, pytest.mark.timeout(240)]

SHARDS = 2
# Both shards hold pairs; ETH-RUB (shard 1) is a cross rate whose USD-RUB leg is an item of
# shard 0, so shard 1's owner quotes a leg whose item it does not write.
PAIRS = ("BTC-USD", "USD-RUB", "BNB-USDT", "ETH-USD", "ETH-RUB", "SOL-USD")
# CBR's USD-RUB is a daily rate: it gets no new version while the test runs; the others move.
MOVING = tuple(pair for pair in PAIRS if pair != "USD-RUB")
# The lease's TTL (rates.lease) plus a renewal period and a poll: the slowest take-over the
# rules allow, with room for a machine shared with other work.
TAKE_OVER_WITHIN = 6.0 + 1.5 + 1.0 + 10.0


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    require("PostgreSQL", "127.0.0.1", 5432)
    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith("postgres"):
        base = POSTGRES_URL.rsplit("/", 1)[0] + "/kurs"
    return f"{base}_sharded_{os.getpid()}"


@pytest_asyncio.fixture
async def stack(tmp_path: Path, database_url: str | None) -> AsyncIterator[Stack]:
    require("NATS", "127.0.0.1", 4222)
    async with run_emulator_server(host="127.0.0.1", port=0, tick=0.5, seed=7) as emulator:
        built = Stack(
            folder=tmp_path,
            emulator=emulator,
            providers="binance,bybit,cbr",
            poll=1.0,
            database_url=database_url,
            extra_env={"KURS_OWNER_SHARDS": str(SHARDS)},
        )
        await asyncio.to_thread(_migrate, built, emulator)
        try:
            yield built
        finally:
            await asyncio.to_thread(built.stop)
            await asyncio.to_thread(built.drop_database)


def _migrate(stack: Stack, emulator: EmulatorServer) -> None:
    stack.migrate(active=())
    create = "; ".join(
        f"Item.objects.update_or_create(base='{code.split('-')[0]}', quote='{code.split('-')[1]}',"
        " defaults={'is_active': True})"
        for code in PAIRS
    )
    stack.manage("shell", "-c", f"from items.models import Item; {create}")


def holders(stack: Stack) -> dict[int, str]:
    """Shard -> the instance name of its live holder."""
    rows = stack.query("SELECT name, holder, expires_at FROM rates_ownerlease")
    live: dict[int, str] = {}
    for name, holder, _ in rows:
        if name.startswith("live-rates/") and name.endswith(f"of{SHARDS}"):
            live[int(name.split("/")[1].split("of")[0])] = str(holder).split(":")[0]
    return live


def versions(stack: Stack) -> dict[str, int]:
    rows = stack.query(
        "SELECT i.code, c.version FROM rates_currentrate c JOIN items_item i ON i.id = c.item_id"
    )
    return {str(code): int(version) for code, version in rows}


def served_versions(stack: Stack) -> dict[str, list[int]]:
    rows = stack.query(
        "SELECT i.code, s.version FROM rates_servedrate s JOIN items_item i ON i.id = s.item_id"
        " ORDER BY s.id"
    )
    served: dict[str, list[int]] = {}
    for code, version in rows:
        served.setdefault(str(code), []).append(int(version))
    return served


async def test_two_owners_share_the_pairs_and_one_takes_the_other_s_shard_after_a_sigkill(
    stack: Stack,
) -> None:
    heard: list[tuple[str, int, str]] = []  # (pair, version, origin)
    cycles: list[tuple[str, tuple[int, ...]]] = []  # fetch.completed: (origin, shards)
    client = await nats.connect(NATS_URL)

    async def record(msg: Msg) -> None:
        data = json.loads(msg.data)["data"]
        heard.append((data["direction"], data["version"], (msg.headers or {})["Kurs-Origin"]))

    async def record_cycle(msg: Msg) -> None:
        shards = tuple(json.loads(msg.data)["data"]["shards"])
        cycles.append(((msg.headers or {})["Kurs-Origin"], shards))

    try:
        await client.subscribe(f"{stack.prefix}.rates.>", cb=record)
        await client.subscribe(f"{stack.prefix}.fetch.completed", cb=record_cycle)
        await client.flush()
        fetchers = {name: stack.fetcher(name) for name in ("fetcher-a", "fetcher-b")}
        await wait_until(
            lambda: len(set(holders(stack).values())) == SHARDS,
            within=60,
            what="each fetcher owning one shard",
        )
        owner_of = holders(stack)
        # The first fetcher up may own both shards until the second shows up and gets its
        # share: what was written before this assignment is not checked against it.
        settled = versions(stack)
        await wait_until(
            lambda: set(versions(stack)) == set(PAIRS), within=60, what="every pair served"
        )

        def since_settled() -> list[tuple[str, int, str]]:
            return [event for event in heard if event[1] > settled.get(event[0], 0)]

        await wait_until(
            lambda: {pair for pair, _, _ in since_settled()} >= set(MOVING),
            within=30,
            what="every pair's rate.updated",
        )
        # Each pair is written and announced by its shard's owner alone.
        for pair, _, origin in since_settled():
            assert origin == owner_of[shard_of(pair, SHARDS)], (pair, origin, owner_of)
        assert holders(stack) == owner_of
        # ETH-RUB (shard 1) is crossed through USD-RUB, whose item is shard 0's.
        assert shard_of("ETH-RUB", SHARDS) != shard_of("USD-RUB", SHARDS)
        (provider,) = stack.query(
            "SELECT c.provider FROM rates_currentrate c JOIN items_item i ON i.id = c.item_id"
            " WHERE i.code = 'ETH-RUB'"
        )[0]
        assert str(provider).endswith("+cbr"), provider
        for name, process in fetchers.items():
            assert f"of {SHARDS}" in process.text(), name
        # Each owner announces its own cycles, naming its shards: one event per owner.
        seen_from = len(cycles)
        await wait_until(
            lambda: {origin for origin, _ in cycles[seen_from:]} == set(owner_of.values()),
            within=30,
            what="each owner's fetch.completed",
        )
        for origin, shards in cycles[seen_from:]:
            assert shards == tuple(s for s, o in sorted(owner_of.items()) if o == origin)

        # SIGKILL the owner of shard 1: the other owner takes it and serves every pair.
        victim = owner_of[1]
        survivor = owner_of[0]
        killed_at = time.monotonic()
        await asyncio.to_thread(fetchers[victim].kill)
        before = versions(stack)  # read once the victim is gone: any newer version is not its
        await wait_until(
            lambda: holders(stack).get(1) == survivor,
            within=TAKE_OVER_WITHIN,
            what="the survivor taking the dead owner's shard",
        )
        took = time.monotonic() - killed_at
        await wait_until(
            lambda: all(versions(stack).get(pair, 0) > before[pair] for pair in MOVING),
            within=30,
            what="every pair written again after the take-over",
        )
        print(f"shard 1 taken over {took:.1f}s after the SIGKILL")

        def after_kill() -> list[tuple[str, str]]:
            return [(pair, origin) for pair, version, origin in heard if version > before[pair]]

        await wait_until(
            lambda: {pair for pair, _ in after_kill()} >= set(MOVING),
            within=10,
            what="every moving pair's new versions on NATS",
        )
        assert {origin for _, origin in after_kill()} == {survivor}
    finally:
        await client.close()

    # Per pair, versions only ever go up, each once: in the served log and on the stream (what
    # clients resume from; a relayed event, re-sent with its id, is dropped there). Plain NATS
    # subscribers may hear a relayed event twice: the shard changed hands after all.
    for pair, served in served_versions(stack).items():
        assert served == sorted(set(served)), pair
    for pair, streamed in (await stream_versions(stack)).items():
        assert streamed == list(range(streamed[0], streamed[-1] + 1)), pair  # none lost


async def stream_versions(stack: Stack) -> dict[str, list[int]]:
    """Each pair's `rate.updated` versions in the JetStream stream's order."""
    client = await nats.connect(NATS_URL)
    try:
        js = client.jetstream()
        name = stream_name(stack.prefix)
        state = (await js.stream_info(name)).state
        found: dict[str, list[int]] = {}
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await js.get_msg(name, seq)
            if msg.subject and msg.subject.startswith(f"{stack.prefix}.rates.") and msg.data:
                data = json.loads(msg.data)["data"]
                found.setdefault(data["direction"], []).append(data["version"])
        return found
    finally:
        await client.close()
