"""Kurs's real processes for end-to-end tests and benchmarks: fetchers, web, and their watchers.

A `Stack` is a migrated SQLite file, a NATS prefix of its own on a real NATS server, and the
processes started against them (`run_fetch --watch`, uvicorn) with their logs under one folder.
The watchers see what a user sees: REST `latest` over HTTP, `/ws/items` over a WebSocket, and
`<prefix>.rates.<pair>` on NATS, each recording when it first showed a given serving provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from websockets.asyncio.client import connect as ws_connect

from rates.emulator import EmulatorServer
from tests.services import NATS_URL, ROOT, free_port, wait_for_port

SECRET = "kurs-test-secret-key-not-for-production"


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no lease released."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Stack:
    folder: Path
    emulator: EmulatorServer
    providers: str = "binance,bybit"
    poll: float = 2.0
    stale_after: float = 30.0
    nats_url: str = NATS_URL
    prefix: str = field(default_factory=lambda: f"kurse2e{uuid.uuid4().hex[:8]}")
    processes: list[Process] = field(default_factory=list)

    @property
    def database(self) -> Path:
        return self.folder / "kurs.sqlite3"

    def env(self, instance: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("KURS_", "DJANGO_", "DATABASE_URL", "REDIS_URL", "NATS_URL"))
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "DJANGO_DEBUG": "false",
                "DJANGO_SECRET_KEY": SECRET,
                "DATABASE_URL": f"sqlite:///{self.database}",
                "NATS_URL": self.nats_url,
                "KURS_NATS_PREFIX": self.prefix,
                "KURS_INSTANCE": instance,
                "KURS_PROVIDERS": self.providers,
                "KURS_POLL_INTERVAL": f"{self.poll:g}",
                "KURS_STALE_AFTER": f"{self.stale_after:g}",
                "KURS_SHARED_CACHE_DIR": str(self.folder / "cache"),
                "KURS_LOG_LEVEL": "INFO",
            }
        )
        for name in ("binance", "bybit", "coingecko", "cbr"):
            env[f"KURS_{name.upper()}_REST_URL"] = self.emulator.rest_url(name)
        for name in ("binance", "bybit"):
            env[f"KURS_{name.upper()}_WS_URL"] = self.emulator.ws_url(name)
        return env

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env("manage"),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def migrate(self, *, active: tuple[str, ...] = ("BTC-USD", "ETH-USD")) -> None:
        """A fresh database tracking only `active` (fewer pairs: less noise, faster cycles)."""
        self.manage("migrate", "--noinput", "-v", "0")
        with contextlib.closing(sqlite3.connect(self.database)) as db, db:
            db.execute("UPDATE items_item SET is_active = 0")
            db.executemany(
                "UPDATE items_item SET is_active = 1 WHERE code = ?", [(c,) for c in active]
            )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.database, timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def item_id(self, code: str) -> int:
        return int(self.query("SELECT id FROM items_item WHERE code = ?", code)[0][0])

    def lease(self) -> tuple[str, int] | None:
        rows = self.query("SELECT holder, epoch FROM rates_ownerlease")
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def spawn(self, name: str, args: list[str], *, port: int | None = None) -> Process:
        log = self.folder / f"{name}.log"
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=self.env(name),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        process = Process(name, popen, log, port)
        self.processes.append(process)
        return process

    def fetcher(self, name: str = "fetcher") -> Process:
        return self.spawn(name, [sys.executable, "manage.py", "run_fetch", "--watch"])

    def web(self, name: str = "web") -> Process:
        port = free_port()
        uvicorn = str(Path(sys.executable).parent / "uvicorn")
        args = [uvicorn, "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
        process = self.spawn(name, [*args, "--lifespan", "on", "--no-access-log"], port=port)
        try:
            wait_for_port(port, 30.0)
        except TimeoutError:
            raise AssertionError(f"{name} did not start:\n{process.text()}") from None
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@dataclass
class Sighting:
    """When each surface first showed `provider` with `status` for the pair (monotonic time)."""

    provider: str
    status: str
    at: dict[str, float] = field(default_factory=dict)
    everywhere: asyncio.Event = field(default_factory=asyncio.Event)


class Watchers:
    """REST, WebSocket and NATS views of one pair, each remembering what it last showed."""

    def __init__(self, stack: Stack, web: Process, pair: str) -> None:
        self.stack, self.web, self.pair = stack, web, pair
        self.latest: dict[str, tuple[str, str] | None] = {"rest": None, "ws": None, "nats": None}
        self.waiting: list[Sighting] = []
        self.events: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = {name: asyncio.Event() for name in self.latest}

    def _saw(self, surface: str, provider: str, status: str) -> None:
        self.latest[surface] = (provider, status)
        self._ready[surface].set()
        now = time.monotonic()
        for sighting in self.waiting:
            if (provider, status) == (sighting.provider, sighting.status):
                sighting.at.setdefault(surface, now)
                if len(sighting.at) == len(self.latest):
                    sighting.everywhere.set()

    async def _rest(self) -> None:
        url = f"http://127.0.0.1:{self.web.port}/api/v1/items/{self.stack.item_id(self.pair)}"
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                response = await client.get(f"{url}/rates/latest")
                if response.status_code == 200:
                    body = response.json()
                    self._saw("rest", body["provider"], body["status"])
                await asyncio.sleep(0.05)

    async def _ws(self) -> None:
        url = f"ws://127.0.0.1:{self.web.port}/ws/items?pairs={self.pair}"
        origin = f"http://127.0.0.1:{self.web.port}"
        async with ws_connect(url, origin=origin) as ws:  # type: ignore[arg-type]
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "snapshot":
                    for course in message["data"]["courses"]:
                        self._saw("ws", course["provider"], course["status"])
                elif message["type"] == "rate.updated":
                    self._saw("ws", message["data"]["provider"], message["data"]["status"])

    async def _nats(self) -> None:
        client = await nats.connect(self.stack.nats_url)
        try:
            queue: asyncio.Queue[Any] = asyncio.Queue()
            await client.subscribe(f"{self.stack.prefix}.rates.{self.pair}", cb=queue.put)
            await client.flush()
            self._ready["nats"].set()
            while True:
                msg = await queue.get()
                data = json.loads(msg.data)["data"]
                self.events.append(data)
                self._saw("nats", data["provider"], data["status"])
        finally:
            await client.close()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(watch()) for watch in (self._rest, self._ws, self._nats)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready.values())), 30)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def until(
        self, provider: str, status: str, action: Callable[[], None], *, within: float
    ) -> dict[str, float]:
        """Run `action`, then seconds until each surface showed `provider` with `status`."""
        sighting = Sighting(provider, status)
        self.waiting.append(sighting)
        started = time.monotonic()
        action()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sighting.everywhere.wait(), within)
        self.waiting.remove(sighting)
        return {surface: round(at - started, 3) for surface, at in sighting.at.items()}


@contextlib.asynccontextmanager
async def watching(stack: Stack, web: Process, pair: str) -> AsyncIterator[Watchers]:
    watchers = Watchers(stack, web, pair)
    await watchers.start()
    try:
        yield watchers
    finally:
        await watchers.stop()


async def wait_until(check: Callable[[], bool], *, within: float, what: str) -> float:
    """Poll `check` every 50 ms; seconds it took, or AssertionError naming `what`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started
