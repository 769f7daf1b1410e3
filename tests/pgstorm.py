"""The PostgreSQL storm under reads (issue 17), for `tests/test_faults.py` and
`bench/bench_pg_storm.py`: every connection of a stack's processes terminated ten times a second
while a few clients read as fast as the web answers, each answer kept.

A read whose connection ended is read again once on a new connection by the edge, else answered
503 JSON with Retry-After (`edge.errors`); health says `down` (503, its report) only when a new
connection fails too. Anything else at or above 500 is a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psycopg

from tests.stack import Stack

# The storm's own connection: spared by the storm (by its application_name).
PROBE = "kurs-storm-probe"
HEALTH = "/api/v1/health"


def storm_reads(item_id: int) -> list[str]:
    """The reads issue 17 saw answer 500 in the storm, and the cheap ones around them."""
    return [
        f"/api/v1/items/{item_id}/candles?interval=1m",
        f"/api/v1/items/{item_id}/rates?limit=5",
        f"/api/v1/items/{item_id}/rates/latest",
        "/api/v1/items",
        f"/api/v1/items/{item_id}",
        "/api/v1/providers",
        HEALTH,
        "/",
    ]


def refused_cleanly(path: str, response: httpx.Response) -> bool:
    """A 503 a client can act on: JSON {"detail": ...} and when to ask again; or health's
    report saying the database is down (health's contract, for load balancers)."""
    if response.status_code != 503:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    if path == HEALTH:
        return body.get("status") == "down"
    return "Retry-After" in response.headers and isinstance(body.get("detail"), str)


@dataclass
class Storm:
    seconds: float
    clients: int
    terminated: int = 0
    seen: list[tuple[str, httpx.Response]] = field(default_factory=list)

    @property
    def counts(self) -> Counter[int]:
        return Counter(response.status_code for _, response in self.seen)

    @property
    def refused(self) -> int:
        return sum(1 for path, response in self.seen if refused_cleanly(path, response))

    @property
    def failed(self) -> list[tuple[str, int, str]]:
        """Every answer at or above 500 but a clean 503: (path, status, the body's start)."""
        return [
            (path, r.status_code, r.text[:200])
            for path, r in self.seen
            if r.status_code >= 500 and not refused_cleanly(path, r)
        ]

    def summary(self) -> str:
        counts = self.counts
        by_path: dict[str, Counter[int]] = {}
        for path, response in self.seen:
            by_path.setdefault(path, Counter())[response.status_code] += 1
        per_path = "; ".join(
            f"{path} {dict(sorted(codes.items()))}" for path, codes in by_path.items()
        )
        return (
            f"pg storm ({self.seconds:g} s, {self.terminated} backends terminated,"
            f" {self.clients} clients): {len(self.seen)} reads, {counts[200]} x 200,"
            f" {self.refused} x clean 503,"
            f" {len(self.failed)} x other 5xx; by path: {per_path}"
        )


async def _terminate(stack: Stack, ends: float) -> int:
    """pg_terminate_backend on every connection to the stack's database but the probe's, ten
    times a second until `ends` (time.monotonic()); how many backends it ended."""
    assert stack.database_url, "the storm needs PostgreSQL"
    database = stack.database_url.rsplit("/", 1)[1]
    terminated = 0
    async with await psycopg.AsyncConnection.connect(
        f"{stack.database_url}?application_name={PROBE}", autocommit=True
    ) as probe:
        while time.monotonic() < ends:
            cursor = await probe.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND application_name <> %s",
                [database, PROBE],
            )
            terminated += len(await cursor.fetchall())
            await asyncio.sleep(0.1)  # the storm's pace: ten rounds a second
    return terminated


async def _read(
    base: str, paths: list[str], ends: float, seen: list[tuple[str, httpx.Response]]
) -> None:
    """One client reading `paths` in turn, as fast as answers come, until `ends`."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for path in itertools.cycle(paths):
            if time.monotonic() >= ends:
                return
            seen.append((path, await client.get(path)))


async def storm(
    stack: Stack, base: str, paths: list[str], *, seconds: float = 10.0, clients: int = 4
) -> Storm:
    """`clients` clients reading `paths` from `base` while the storm lasts `seconds`."""
    result = Storm(seconds, clients)
    ends = time.monotonic() + seconds
    terminated = asyncio.ensure_future(_terminate(stack, ends))
    await asyncio.gather(*(_read(base, paths, ends, result.seen) for _ in range(clients)))
    result.terminated = await terminated
    return result
