"""One owner of live rates, end to end over real processes.

Fetchers (`run_fetch --watch`) and a uvicorn web process share a SQLite file and a NATS prefix on
the machine's NATS; the emulator in this process plays the exchanges. What is checked is what a
user sees: REST `latest`, the `/ws/items` socket and `<prefix>.rates.BTC-USD` on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from rates.emulator import EmulatorServer, run_emulator_server
from tests.services import NATS_URL, require, run_python
from tests.stack import Stack, wait_until, watching

pytestmark = [pytest.mark.nats, pytest.mark.timeout(180)]

PAIR = "BTC-USD"


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as server:
        yield server


@pytest_asyncio.fixture
async def stack(tmp_path: Path, emulator: EmulatorServer) -> AsyncIterator[Stack]:
    require("NATS", "127.0.0.1", 4222)
    built = Stack(folder=tmp_path, emulator=emulator)
    await asyncio.to_thread(built.migrate)
    try:
        yield built
    finally:
        await asyncio.to_thread(built.stop)


def current_version(stack: Stack) -> int:
    rows = stack.query(
        "SELECT version FROM rates_currentrate WHERE item_id = ?", stack.item_id(PAIR)
    )
    return int(rows[0][0]) if rows else 0


def held_lease(stack: Stack) -> tuple[str, int]:
    lease = stack.lease()
    assert lease is not None, "no fetcher holds the lease"
    return lease


async def test_two_fetchers_one_owns_and_the_other_takes_over_after_a_sigkill(
    stack: Stack,
) -> None:
    first, second = stack.fetcher("fetcher-a"), stack.fetcher("fetcher-b")
    await wait_until(lambda: stack.lease() is not None, within=30, what="a lease")
    owner_name = held_lease(stack)[0].split(":")[0]
    owner, standby = (first, second) if owner_name == "fetcher-a" else (second, first)
    await wait_until(lambda: "standby" in standby.text(), within=15, what="the standby's log")
    await wait_until(
        lambda: bool(stack.query("SELECT 1 FROM rates_currentrate")), within=30, what="rate"
    )
    epoch = held_lease(stack)[1]
    version = current_version(stack)

    await asyncio.to_thread(owner.kill)
    # How soon is the lease's TTL, a figure of bench/, not of this test: it waits generously.
    await wait_until(
        lambda: (stack.lease() or ("", 0))[0].startswith(standby.name),
        within=30,
        what="the standby taking the lease over",
    )
    assert held_lease(stack)[1] == epoch + 1
    # ...and it writes: the pair is confirmed by the new owner, the version goes on from there.
    await wait_until(lambda: current_version(stack) > version, within=10, what="a new write")
    assert "owner: live rates loaded for" in standby.text()


async def test_a_safety_net_cycle_during_a_live_fetcher_does_nothing_and_publishes_nothing(
    stack: Stack,
) -> None:
    stack.fetcher()
    await wait_until(lambda: stack.lease() is not None, within=30, what="a lease")
    heard: list[str] = []
    client = await nats.connect(NATS_URL)
    try:

        async def record(msg: Msg) -> None:
            heard.append((msg.headers or {}).get("Kurs-Origin", ""))

        await client.subscribe(f"{stack.prefix}.>", cb=record)
        await client.flush()
        env = stack.env("qcluster-probe")
        code = (
            "import django, json; django.setup(); from rates.tasks import fetch_rates; "
            "print(json.dumps(fetch_rates()))"
        )
        result = await asyncio.to_thread(run_python, ["-c", code], env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1]) == {
            "skipped": "a live owner holds the lease"
        }
        # The owner keeps publishing; the safety net's process never does.
        await wait_until(lambda: len(heard) >= 3, within=15, what="the owner's events")
        assert "qcluster-probe" not in heard
        assert set(heard) == {"fetcher"}
    finally:
        await client.close()


async def test_tasks_run_is_answered_by_the_live_owner(stack: Stack) -> None:
    stack.fetcher()
    web = stack.web()
    await wait_until(lambda: stack.lease() is not None, within=30, what="a lease")
    key = (await asyncio.to_thread(stack.manage, "create_api_key", "e2e")).stdout.split()[-1]

    client = await nats.connect(NATS_URL)
    origins: list[str] = []
    try:

        async def record(msg: Msg) -> None:
            origins.append((msg.headers or {}).get("Kurs-Origin", ""))

        await client.subscribe(f"{stack.prefix}.fetch.completed", cb=record)
        await client.flush()
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                f"http://127.0.0.1:{web.port}/api/v1/tasks/run", headers={"X-API-Key": key}
            )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["providers"] == {"binance": "ok", "bybit": "ok"}
        await wait_until(lambda: bool(origins), within=5, what="fetch.completed")
        assert set(origins) == {"fetcher"}  # the owner ran it, not the web process
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def owner_events(stack: Stack) -> AsyncIterator[list[dict[str, Any]]]:
    """Every Kurs event on the stack's prefix, in the order the owner published them."""
    heard: list[dict[str, Any]] = []
    client = await nats.connect(NATS_URL)

    async def record(msg: Msg) -> None:
        heard.append(json.loads(msg.data))

    try:
        await client.subscribe(f"{stack.prefix}.>", cb=record)
        await client.flush()
        yield heard
    finally:
        await client.close()


def polls_until(heard: list[dict[str, Any]], since: int, provider: str, status: str) -> int:
    """How many fetch cycles ended, after event `since`, before PAIR went to provider/status."""
    cycles = 0
    wanted = (PAIR, provider, status)
    for event in heard[since:]:
        data = event["data"]
        if event["type"] == "fetch.completed":
            cycles += 1
        elif event["type"] == "rate.updated" and (
            (data["direction"], data["provider"], data.get("status")) == wanted
        ):
            return cycles
    raise AssertionError(f"{PAIR} never went to {provider} ({status}) on NATS")


@pytest.mark.parametrize("mode", ["down", "stale"])
async def test_failover_shows_on_rest_websocket_and_nats_within_one_poll_and_a_second(
    stack: Stack, emulator: EmulatorServer, mode: str
) -> None:
    """Counted in the owner's polls, not in seconds (the latencies are bench/'s): the pair fails
    over in the poll after the fault (the one running then may end first), a stalled feed once
    its quotes are `stale_after` old, and comes back at the next poll after the recovery."""
    stack.stale_after = 4.0  # a stalled feed turns stale this long after its last quote
    if mode == "stale":
        # Binance's ticker has no time field; Bybit's has: Bybit is the one that can stall.
        stack.providers = "bybit,binance"
    first, second = stack.providers.split(",")
    stack.fetcher()
    web = stack.web()
    polls = 2 + (math.ceil(stack.stale_after / stack.poll) if mode == "stale" else 0)
    async with watching(stack, web, PAIR) as watch, owner_events(stack) as heard:
        await wait_until(
            lambda: set(watch.latest.values()) == {(first, "live")},
            within=30,
            what=f"{first} serving on every surface",
        )
        since = len(heard)
        down = await watch.until(
            second, "failover", lambda: emulator.set_fault(first, mode), within=30
        )
        assert set(down) == {"rest", "ws", "nats"}, down
        assert polls_until(heard, since, second, "failover") <= polls
        since = len(heard)
        back = await watch.until(first, "live", lambda: emulator.set_fault(first, "ok"), within=30)
        assert set(back) == {"rest", "ws", "nats"}, back
        assert polls_until(heard, since, first, "live") <= 2
        # Versions only go up, one per published change.
        versions = [event["version"] for event in watch.events]
        assert versions == sorted(versions)
        assert len(set(versions)) == len(versions)


async def test_a_created_item_is_quoted_at_once_with_its_true_first_status(
    stack: Stack, emulator: EmulatorServer
) -> None:
    """Items created over the API while the owner runs: SOL-USD is first published `live` from
    Binance though Bybit answers first (Binance is slow), and CNY-RUB, which only CBR (polled
    hourly) quotes, reaches `/courses`; both from the item events, not a poll: none comes while
    the test runs, so an owner deaf to item events fails the waits (bounded, not timed)."""
    stack.providers = "binance,bybit,cbr"
    stack.poll = 3600.0  # one poll, at the start: every later quote is the item events' doing
    emulator.set_fault("binance", "slow", delay=0.3)
    # BTC-RUB's leg USD-RUB is CBR's: CBR answers the first cycle and is not asked for an hour.
    stack.query("UPDATE items_item SET is_active = true WHERE code = ?", "BTC-RUB")
    heard: list[dict[str, Any]] = []
    client = await nats.connect(NATS_URL)
    try:

        async def record(msg: Msg) -> None:
            heard.append(json.loads(msg.data))

        # Listening before the owner starts: its first cycle is the only one it runs.
        await client.subscribe(f"{stack.prefix}.>", cb=record)
        await client.flush()
        stack.fetcher()
        web = stack.web()
        base_url = f"http://127.0.0.1:{web.port}/api/v1"
        await wait_until(lambda: stack.lease() is not None, within=30, what="a lease")
        key = (await asyncio.to_thread(stack.manage, "create_api_key", "e2e")).stdout.split()[-1]
        await wait_until(
            lambda: any(event["type"] == "fetch.completed" for event in heard),
            within=30,
            what="the owner's first cycle",
        )
        async with httpx.AsyncClient(timeout=10) as http:
            for base, quote in (("SOL", "USD"), ("CNY", "RUB")):
                response = await http.post(
                    f"{base_url}/items",
                    json={"base": base, "quote": quote},
                    headers={"X-API-Key": key},
                )
                assert response.status_code == 201, response.text

            async def on_courses() -> bool:
                response = await http.get(f"{base_url}/courses?direction=CNY-RUB")
                body = response.json() if response.status_code == 200 else {}
                return body.get("exchanger") == "cbr" and bool(body["courses"])

            deadline = time.monotonic() + 60  # a bound on the wait, far short of the next poll
            while not await on_courses():
                assert time.monotonic() < deadline, "CNY-RUB not shown on /courses"
                await asyncio.sleep(0.05)

        def published(pair: str) -> list[dict[str, Any]]:
            return [
                event["data"]
                for event in heard
                if event["type"] == "rate.updated" and event["data"]["direction"] == pair
            ]

        await wait_until(lambda: bool(published("SOL-USD")), within=60, what="SOL-USD")
        sol = published("SOL-USD")[0]
        cny = published("CNY-RUB")[0]
    finally:
        await client.close()
    assert (sol["provider"], sol["status"], sol["version"]) == ("binance", "live", 1)
    assert (cny["provider"], cny["status"]) == ("cbr", "live")
