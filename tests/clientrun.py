"""The Python client (clients/python) under forced disconnects: shared by tests/test_client.py
and bench/bench_client_resume.py.

A `Recorder` runs one `kurs_client` stream in the background and keeps every event it yields;
`versions_report` compares the versions of each pair it received with what the database says
was published (versions are +1 on every published change, so every version from the first one
received up to the current one must arrive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kurs_client import Event, EventStream, RateUpdate, Snapshot
from websockets.asyncio.client import connect as ws_connect

from rates.emulator import run_emulator_server
from tests.services import NatsServer, RedisServer, free_port
from tests.stack import Process, Stack, wait_until

WITHIN = 30.0


@dataclass
class Recorder:
    """Every event one stream yields, in order, with each pair's rate versions."""

    stream: EventStream
    events: list[Event] = field(default_factory=list)
    versions: dict[str, list[int]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for event in self.stream:
            self.events.append(event)
            if isinstance(event.data, RateUpdate):
                self.versions.setdefault(event.data.direction, []).append(event.data.version)

    def latest(self, pair: str) -> int:
        return (self.versions.get(pair) or [0])[-1]

    def count(self) -> int:
        return sum(len(v) for v in self.versions.values())

    async def until_more(self, more: int = 1) -> None:
        """Until `more` rate events arrive after now."""
        target = self.count() + more
        await wait_until(lambda: self.count() >= target, within=WITHIN, what="rate events")


class Kurs:
    """A running stack for the client: its web process restarts in place."""

    def __init__(self, stack: Stack, web: Process, nats: NatsServer) -> None:
        self.stack, self.web, self.nats = stack, web, nats

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web.port}"

    def restart_web(self, *, kill: bool = True) -> None:
        self.web = restart_web(self.stack, self.web, kill=kill)


@contextlib.asynccontextmanager
async def kurs_stack(folder: Path, pairs: tuple[str, ...], *, seed: int) -> AsyncIterator[Kurs]:
    """A nats-server with JetStream and a redis-server of its own, the emulator (prices moving
    every 0.5 s), a fetcher polling every second and a web process, rates for every pair."""
    nats_server = NatsServer(port=free_port(), store_dir=folder / "jetstream")
    redis = RedisServer(port=free_port())
    nats_server.start()
    redis.start()
    try:
        async with run_emulator_server(host="127.0.0.1", port=0, tick=0.5, seed=seed) as emulator:
            stack = Stack(
                folder=folder,
                emulator=emulator,
                poll=1.0,
                nats_url=nats_server.url,
                redis_url=redis.url,
            )
            await asyncio.to_thread(stack.migrate, active=pairs)
            stack.fetcher()
            web = await asyncio.to_thread(stack.web)
            try:
                await wait_until(
                    lambda: len(stack.query("SELECT 1 FROM rates_currentrate")) == len(pairs),
                    within=60,
                    what="current rates for every pair",
                )
                yield Kurs(stack, web, nats_server)
            finally:
                await asyncio.to_thread(stack.stop)
    finally:
        nats_server.kill()
        redis.kill()


def caught_up(recorder: Recorder, target: dict[str, int]) -> Callable[[], bool]:
    """Whether `recorder` has each pair's `target` version (or a later one)."""
    return lambda: all(recorder.latest(pair) >= version for pair, version in target.items())


@contextlib.asynccontextmanager
async def recording(stream: EventStream) -> AsyncIterator[Recorder]:
    recorder = Recorder(stream)
    recorder.task = asyncio.create_task(recorder._run())
    try:
        await wait_until(lambda: bool(recorder.events), within=WITHIN, what="a first event")
        yield recorder
    finally:
        await stream.aclose()
        recorder.task.cancel()
        await asyncio.gather(recorder.task, return_exceptions=True)


@dataclass
class NaiveSocket:
    """The baseline: what a hand-written client does, reconnecting to `/ws/items` without
    `since` and keeping every `rate.updated` version it is sent."""

    url: str
    versions: dict[str, list[int]] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError, Exception):
                async with ws_connect(self.url) as socket:
                    async for raw in socket:
                        frame: dict[str, Any] = json.loads(raw)
                        if frame["type"] == "rate.updated":
                            data = frame["data"]
                            self.versions.setdefault(data["direction"], []).append(data["version"])
            await asyncio.sleep(0.25)


def database_versions(stack: Stack, pairs: Iterable[str]) -> dict[str, int]:
    """Each pair's current version, as stored."""
    return {
        pair: int(
            stack.query(
                "SELECT version FROM rates_currentrate WHERE item_id = ?", stack.item_id(pair)
            )[0][0]
        )
        for pair in pairs
    }


@dataclass(frozen=True)
class Report:
    expected: int
    received: int
    missing: list[int]
    duplicates: int
    out_of_order: int


def versions_report(received: list[int], first: int, current: int) -> Report:
    """`received` against every version from `first` to `current` (the database's)."""
    expected = set(range(first, current + 1))
    seen: set[int] = set()
    duplicates = out_of_order = 0
    for previous, version in zip([None, *received], received, strict=False):
        if version in seen:
            duplicates += 1
        elif previous is not None and version < previous:
            out_of_order += 1
        seen.add(version)
    return Report(
        expected=len(expected),
        received=len(seen & expected),
        missing=sorted(expected - seen),
        duplicates=duplicates,
        out_of_order=out_of_order,
    )


def restart_web(stack: Stack, web: Process, *, kill: bool = True) -> Process:
    """Stop `web` (SIGKILL, or SIGTERM: a clean shutdown closing sockets with 1012) and start a
    new web process on the same port, as a supervisor would."""
    if kill:
        web.kill()
    else:
        web.stop()
    return stack.web(web.name, port=web.port)


def first_versions(recorder: Recorder) -> dict[str, int]:
    """The version each pair was at in the first snapshot (the versions after it must all come)."""
    first = recorder.events[0]
    assert isinstance(first.data, Snapshot), first
    return {course.direction: course.version + 1 for course in first.data.courses}
