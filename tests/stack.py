"""Kurs's real processes for end-to-end tests and benchmarks: fetchers, web, and their watchers.

A `Stack` is a migrated database (a SQLite file, or a PostgreSQL database of its own when
`database_url` is set), a NATS prefix of its own on a real NATS server, optionally a Redis, and the
processes started against them (`run_fetch --watch`, uvicorn) with their logs under one folder.
The watchers see what a user sees: REST `latest` over HTTP, `/ws/items` over a WebSocket, and
`<prefix>.rates.<pair>` on NATS (optionally also `/courses` and the SSE stream), each recording
when it first showed a given serving provider.
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
import psycopg
from websockets.asyncio.client import connect as ws_connect

from rates.emulator import EmulatorServer
from tests.services import NATS_URL, ROOT, START_TIMEOUT, free_port, wait_for_port

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
    # postgres://.../<name>: a database of the stack's own, created (anew) by `migrate`.
    database_url: str | None = None
    redis_url: str | None = None
    prefix: str = field(default_factory=lambda: f"kurse2e{uuid.uuid4().hex[:8]}")
    processes: list[Process] = field(default_factory=list)
    # More settings for every process (KURS_PEGS, ...), over the stack's own.
    extra_env: dict[str, str] = field(default_factory=dict)
    # The checkout the processes run from (a bench's baseline may run another one).
    root: Path = ROOT

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
                "DATABASE_URL": self.database_url or f"sqlite:///{self.database}",
                "NATS_URL": self.nats_url,
                "KURS_NATS_PREFIX": self.prefix,
                "KURS_INSTANCE": instance,
                "KURS_PROVIDERS": self.providers,
                "KURS_POLL_INTERVAL": f"{self.poll:g}",
                "KURS_STALE_AFTER": f"{self.stale_after:g}",
                "KURS_SHARED_CACHE_DIR": str(self.folder / "cache"),
                "KURS_LOG_LEVEL": "INFO",
                # Every client of a stack is 127.0.0.1 (the soak: 250 streams).
                "KURS_MAX_CONNECTIONS_PER_CLIENT": "100000",
            }
        )
        env.update(self.extra_env)
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        for name in ("binance", "bybit", "coingecko", "cbr"):
            env[f"KURS_{name.upper()}_REST_URL"] = self.emulator.rest_url(name)
        for name in ("binance", "bybit"):
            env[f"KURS_{name.upper()}_WS_URL"] = self.emulator.ws_url(name)
        return env

    def manage(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`manage.py args` to its end: waited for generously (on two shared cores `migrate`
        alone has taken over two minutes); a command that fails raises at once."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.root,
            env=self.env("manage"),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def migrate(self, *, active: tuple[str, ...] = ("BTC-USD", "ETH-USD")) -> None:
        """A fresh database tracking only `active` (fewer pairs: less noise, faster cycles)."""
        if self.database_url:
            self._create_postgres_database()
        self.manage("migrate", "--noinput", "-v", "0")
        self.query("UPDATE items_item SET is_active = false")
        for code in active:
            self.query("UPDATE items_item SET is_active = true WHERE code = ?", code)

    def _admin_url(self) -> str:
        assert self.database_url
        return self.database_url.rsplit("/", 1)[0] + "/postgres"

    def _postgres_name(self) -> str:
        assert self.database_url
        return self.database_url.rsplit("/", 1)[1]

    def _create_postgres_database(self) -> None:
        with psycopg.connect(self._admin_url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self._postgres_name()}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{self._postgres_name()}"')

    def drop_database(self) -> None:
        """Drop the stack's PostgreSQL database (a SQLite file goes with its folder)."""
        if self.database_url:
            with psycopg.connect(self._admin_url(), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self._postgres_name()}" WITH (FORCE)')

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """`sql` with `?` placeholders, on whichever database the stack has; the rows, if any."""
        if self.database_url:
            with psycopg.connect(self.database_url, autocommit=True) as db:
                cursor = db.execute(sql.replace("?", "%s"), params)
                return cursor.fetchall() if cursor.description else []
        with contextlib.closing(sqlite3.connect(self.database, timeout=10)) as lite, lite:
            return lite.execute(sql, params).fetchall()

    def item_id(self, code: str) -> int:
        return int(self.query("SELECT id FROM items_item WHERE code = ?", code)[0][0])

    def lease(self) -> tuple[str, int] | None:
        rows = self.query("SELECT holder, epoch FROM rates_ownerlease")
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def spawn(self, name: str, args: list[str], *, port: int | None = None) -> Process:
        log = self.folder / f"{name}.log"
        popen = subprocess.Popen(
            args,
            cwd=self.root,
            env=self.env(name),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        process = Process(name, popen, log, port)
        self.processes.append(process)
        return process

    def fetcher(self, name: str = "fetcher") -> Process:
        return self.spawn(name, [sys.executable, "manage.py", "run_fetch", "--watch"])

    def web(self, name: str = "web", *, port: int | None = None) -> Process:
        """A uvicorn web process, on `port` (a web process restarted in place) or a free one."""
        port = port or free_port()
        uvicorn = str(Path(sys.executable).parent / "uvicorn")
        args = [uvicorn, "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--http", "edge.serverprotocol:KursHttpProtocol"]  # as scripts/serve.sh
        process = self.spawn(name, [*args, "--lifespan", "on", "--no-access-log"], port=port)
        try:
            wait_for_port(port, START_TIMEOUT, process.popen)
        except TimeoutError as exc:
            raise AssertionError(f"{name}: {exc}:\n{process.text()}") from None
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@dataclass
class Sighting:
    """When each surface first showed `provider` with `status` for the pair (monotonic time)."""

    provider: str
    status: str
    surfaces: int
    at: dict[str, float] = field(default_factory=dict)
    everywhere: asyncio.Event = field(default_factory=asyncio.Event)


SURFACES = ("rest", "ws", "nats")
# `/courses` names the provider but no status; the SSE stream carries what the WebSocket does.
EVERY_SURFACE = ("rest", "courses", "ws", "sse", "nats")


# Told `(surface, payload)` for every payload a surface shows (REST's body, a course of a
# snapshot or of `/courses`, an event's data).
Listener = Callable[[str, dict[str, Any]], None]


class Watchers:
    """REST, WebSocket and NATS views of one pair (and, when asked, `/courses` and the SSE
    stream), each remembering what it last showed; `expand` goes to REST `latest`, the WebSocket
    and the stream (`sources`: each shows the evidence, as NATS always does)."""

    def __init__(
        self,
        stack: Stack,
        web: Process,
        pair: str,
        surfaces: tuple[str, ...] = SURFACES,
        *,
        expand: str | None = None,
    ) -> None:
        self.stack, self.web, self.pair = stack, web, pair
        self.expand = f"&expand={expand}" if expand else ""  # a query's last parameter
        self.latest: dict[str, tuple[str, str | None] | None] = dict.fromkeys(surfaces)
        self.payloads: dict[str, dict[str, Any]] = {}
        self.listeners: list[Listener] = []
        self.waiting: list[Sighting] = []
        # Every (surface, provider, status) shown, in order: flips too brief for `latest`.
        self.shown: list[tuple[str, str, str | None]] = []
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.monotonic() of each NATS event
        # Envelope type -> surface -> when it first came over the WebSocket or the stream (a
        # caller forgets a type to time its next one).
        self.heard: dict[str, dict[str, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = {name: asyncio.Event() for name in self.latest}

    def _saw(
        self, surface: str, payload: dict[str, Any], provider: str, status: str | None
    ) -> None:
        """`status` None: the surface shows no status (`/courses`), the provider alone counts."""
        self.payloads[surface] = payload
        for listener in self.listeners:
            listener(surface, payload)
        self.latest[surface] = (provider, status)
        self.shown.append((surface, provider, status))
        self._ready[surface].set()
        now = time.monotonic()
        for sighting in self.waiting:
            if provider == sighting.provider and status in (sighting.status, None):
                sighting.at.setdefault(surface, now)
                if len(sighting.at) == sighting.surfaces:
                    sighting.everywhere.set()

    def _saw_envelope(self, surface: str, message: dict[str, Any]) -> None:
        self.heard.setdefault(message["type"], {}).setdefault(surface, time.monotonic())
        if message["type"] == "snapshot":
            for course in message["data"]["courses"]:
                self._saw(surface, course, course["provider"], course["status"])
        elif message["type"] == "rate.updated":
            data = message["data"]
            self._saw(surface, data, data["provider"], data["status"])

    async def _rest(self) -> None:
        url = f"http://127.0.0.1:{self.web.port}/api/v1/items/{self.stack.item_id(self.pair)}"
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{url}/rates/latest?{self.expand[1:]}")
                    if response.status_code == 200:
                        body = response.json()
                        self._saw("rest", body, body["provider"], body["status"])
                await asyncio.sleep(0.05)

    async def _courses(self) -> None:
        url = f"http://127.0.0.1:{self.web.port}/api/v1/courses?direction={self.pair}"
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(url)
                    if response.status_code == 200:
                        body = response.json()
                        course = body["courses"][0] if body["courses"] else {}
                        provider = course.get("exchanger", body["exchanger"])
                        if provider and not course.get("stale"):
                            self._saw("courses", course, provider, None)
                await asyncio.sleep(0.05)

    async def _ws(self) -> None:
        url = f"ws://127.0.0.1:{self.web.port}/ws/items?pairs={self.pair}{self.expand}"
        async with ws_connect(url) as ws:
            async for raw in ws:
                self._saw_envelope("ws", json.loads(raw))

    async def _sse(self) -> None:
        url = f"http://127.0.0.1:{self.web.port}/api/v1/stream?pairs={self.pair}{self.expand}"
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as client,
            client.stream("GET", url) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    self._saw_envelope("sse", json.loads(line.removeprefix("data: ")))

    async def _nats(self) -> None:
        client = await nats.connect(self.stack.nats_url)
        try:
            queue: asyncio.Queue[Any] = asyncio.Queue()
            await client.subscribe(f"{self.stack.prefix}.rates.{self.pair}", cb=queue.put)
            await client.flush()
            self._ready["nats"].set()
            last = 0
            while True:
                msg = await queue.get()
                data = json.loads(msg.data)["data"]
                # A new owner relays what its predecessor sent without an ack recorded: a plain
                # subscriber may hear an old version again and drops it, as every client does
                # (docs/events.md#no-lost-event).
                if int(data.get("version") or 0) <= last:
                    continue
                last = int(data["version"])
                self.arrivals.append(time.monotonic())
                self.events.append(data)
                self._saw("nats", data, data["provider"], data["status"])
        finally:
            await client.close()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(getattr(self, f"_{name}")()) for name in self.latest]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready.values())), 30)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def showing(self, provider: str, *, within: float) -> None:
        """Until every surface shows `provider` serving the pair."""
        await wait_until(
            lambda: all(seen and seen[0] == provider for seen in self.latest.values()),
            within=within,
            what=f"{provider} serving on every surface",
        )

    async def until(
        self, provider: str, status: str, action: Callable[[], None], *, within: float
    ) -> dict[str, float]:
        """Run `action`, then seconds until each surface showed `provider` with `status`."""
        sighting = Sighting(provider, status, len(self.latest))
        self.waiting.append(sighting)
        started = time.monotonic()
        action()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sighting.everywhere.wait(), within)
        self.waiting.remove(sighting)
        return {surface: round(at - started, 3) for surface, at in sighting.at.items()}


@contextlib.asynccontextmanager
async def watching(
    stack: Stack,
    web: Process,
    pair: str,
    surfaces: tuple[str, ...] = SURFACES,
    *,
    expand: str | None = None,
) -> AsyncIterator[Watchers]:
    watchers = Watchers(stack, web, pair, surfaces, expand=expand)
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
