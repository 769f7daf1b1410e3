"""A NATS outage while rates move, seen by clients that resume by `seq` afterwards.

Shared by `tests/test_no_lost_event.py` (which asserts nothing is lost) and
`bench/bench_outbox.py` (which counts what is). A `Stack` runs the fetcher and a web process
against a nats-server with JetStream that this module stops and starts again; a WebSocket and
an SSE client read some rate events, go away, the server is stopped for `outage_s` while the
emulator moves prices every second, it comes back, and both clients resume from their last
`seq`. Every version of every pair is compared with the database's (`CurrentRate.version` is +1
on every published change, so the versions a client must get after its last one are exactly
`last + 1 .. version now`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect

from tests.services import NatsServer
from tests.stack import Process, Stack, wait_until

PAIRS = ("BTC-USD", "ETH-USD")


@dataclass
class Seen:
    """What one client got: rate versions per pair in arrival order, its last seq, gap frames."""

    versions: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PAIRS})
    last_seq: int = 0
    gaps: int = 0

    def take(self, envelope: dict[str, Any]) -> None:
        if envelope["type"] == "gap":
            self.gaps += 1
        if isinstance(envelope.get("seq"), int):
            self.last_seq = envelope["seq"]
        if envelope["type"] == "rate.updated":
            data = envelope["data"]
            self.versions[data["direction"]].append(int(data["version"]))

    def reached(self, targets: dict[str, int]) -> bool:
        return all(v and v[-1] >= targets[pair] for pair, v in self.versions.items())


@dataclass
class Verdict:
    """One client's resume, against the database: versions lost, duplicated, out of order."""

    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    gaps: int = 0

    def __str__(self) -> str:
        return (
            f"expected {self.expected}, received {self.received}, lost {self.lost}, "
            f"duplicates {self.duplicates}, out of order {self.out_of_order}, "
            f"gap frames {self.gaps}"
        )


def judge(before: Seen, after: Seen, targets: dict[str, int]) -> Verdict:
    verdict = Verdict(gaps=after.gaps)
    for pair in PAIRS:
        start = before.versions[pair][-1] if before.versions[pair] else 0
        expected = list(range(start + 1, targets[pair] + 1))
        got = [v for v in after.versions[pair] if v <= targets[pair]]
        verdict.expected += len(expected)
        verdict.received += len(set(got))
        verdict.lost += len(set(expected) - set(got))
        verdict.duplicates += len(got) - len(set(got))
        verdict.out_of_order += sum(1 for a, b in itertools.pairwise(got) if b <= a)
    return verdict


def db_versions(stack: Stack) -> dict[str, int]:
    rows = stack.query(
        "SELECT i.code, c.version FROM rates_currentrate c JOIN items_item i ON i.id = c.item_id"
    )
    found = {str(code): int(version) for code, version in rows}
    return {pair: found.get(pair, 0) for pair in PAIRS}


async def _ws_frames(url: str) -> AsyncIterator[dict[str, Any]]:
    async with ws_connect(url) as ws:
        async for raw in ws:
            yield json.loads(raw)


async def _sse_frames(url: str, last_event_id: int | None) -> AsyncIterator[dict[str, Any]]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


async def _read(
    frames: AsyncIterator[dict[str, Any]], seen: Seen, targets: dict[str, int], within: float
) -> None:
    """Feed `seen` until every pair reached its target version (TimeoutError after `within`)."""
    try:
        async with asyncio.timeout(within):
            async for envelope in frames:
                seen.take(envelope)
                if seen.reached(targets):
                    return
    finally:
        await frames.aclose()  # type: ignore[attr-defined]  # async generators have aclose()


def _clients(web: Process, since: dict[str, int] | None) -> dict[str, AsyncIterator[Any]]:
    pairs = ",".join(PAIRS)
    ws_url = f"ws://127.0.0.1:{web.port}/ws/items?pairs={pairs}"
    sse_url = f"http://127.0.0.1:{web.port}/api/v1/stream?pairs={pairs}"
    if since is None:
        return {"ws": _ws_frames(ws_url), "sse": _sse_frames(sse_url, None)}
    return {
        "ws": _ws_frames(f"{ws_url}&since={since['ws']}"),
        "sse": _sse_frames(sse_url, since["sse"]),  # EventSource's way: Last-Event-ID
    }


async def _until_web_on_nats(web: Process, within: float) -> None:
    url = f"http://127.0.0.1:{web.port}/api/v1/health"
    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(within):
        while True:
            body = (await client.get(url)).json()
            if (
                body["components"]["nats"].get("jetstream")
                and body["components"]["nats"]["status"] == "ok"
            ):
                return
            await asyncio.sleep(0.1)


@dataclass
class OutageResult:
    verdicts: dict[str, Verdict]  # "ws", "sse"
    moved: int  # versions the database gained while NATS was down (all pairs)
    outage_s: float


async def outage_round(
    stack: Stack,
    web: Process,
    server: NatsServer,
    *,
    outage_s: float,
    min_moved: int = 0,
    within: float = 60,
) -> OutageResult:
    """Clients read, leave; NATS stops for `outage_s` and until the database gained `min_moved`
    versions per pair; it returns; the clients resume from their last `seq`."""
    await wait_until(lambda: min(db_versions(stack).values()) >= 2, within=within, what="rates")
    before = {name: Seen() for name in ("ws", "sse")}
    first = {pair: v + 1 for pair, v in db_versions(stack).items()}
    clients = _clients(web, None)
    await asyncio.gather(*(_read(clients[n], before[n], first, within) for n in clients))
    at_stop = db_versions(stack)
    started = time.monotonic()
    await asyncio.to_thread(server.stop)

    def moved() -> dict[str, int]:
        now = db_versions(stack)
        return {pair: now[pair] - at_stop[pair] for pair in PAIRS}

    await wait_until(
        lambda: time.monotonic() - started >= outage_s and min(moved().values()) >= min_moved,
        within=outage_s + within,
        what="the outage with rates moving",
    )
    stopped_for = time.monotonic() - started
    total_moved = sum(moved().values())
    await asyncio.to_thread(server.start)
    # Resumed once the web process is back on NATS (before that, a resume is answered `gap`
    # with `first_available: null`, rightly: the stream cannot be read then).
    await _until_web_on_nats(web, within)
    # A little more than what was written during the outage: the relay, then live events.
    targets = {pair: v + 2 for pair, v in db_versions(stack).items()}
    after = {name: Seen() for name in ("ws", "sse")}
    clients = _clients(web, {name: seen.last_seq for name, seen in before.items()})
    # A client that never reaches its targets (versions lost for good) is judged on what it got.
    await asyncio.gather(
        *(_read(clients[n], after[n], targets, within) for n in clients), return_exceptions=True
    )
    verdicts = {name: judge(before[name], after[name], targets) for name in before}
    return OutageResult(verdicts, total_moved, stopped_for)
