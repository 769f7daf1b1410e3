"""Realtime test set-up: each test gets its own NATS subject prefix and a fresh bridge.

By default NATS points at a closed loopback port, so a test never reaches a shared server by
accident and events take the fallback path; tests that need a real NATS ask for one
(`machine_nats`, `own_nats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import LazySettings
from django.db import connections
from nats.js.errors import NotFoundError

from rates.snapshot import snapshot
from realtime.bridge import bridge
from realtime.hub import hub
from realtime.nats import connection, stream_name
from tests.services import (
    NATS_URL,
    START_TIMEOUT,
    NatsServer,
    free_port,
    require,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[2]
ORIGIN = (b"origin", b"http://localhost")


@pytest.fixture
def prefix() -> str:
    return f"kurst{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
async def realtime_isolated(settings: LazySettings, prefix: str) -> AsyncIterator[None]:
    # A connection left by tests of other apps (a fetch publishes events) still points at the
    # servers of their settings: start every realtime test from none.
    await bridge.stop()
    # Also forgets the outbox's past: an earlier test's rows do not hold this one's events back.
    await asyncio.to_thread(connection.shutdown)
    settings.KURS_NATS_PREFIX = prefix
    settings.NATS_SERVERS = [f"nats://127.0.0.1:{free_port()}"]  # nobody listens there
    settings.KURS_INSTANCE = f"test-{prefix}"
    snapshot.reset()
    yield
    await bridge.stop()
    await asyncio.to_thread(connection.shutdown)
    snapshot.reset()
    # The snapshot and the tests read the database in asgiref's sync thread: close its
    # connection, or PostgreSQL refuses to drop the test database at the end.
    await sync_to_async(connections.close_all)()
    left = hub.sockets()
    for socket_queue in left:
        hub.remove(socket_queue)  # so that one failing test does not fail every later one
    assert not left, "a test left a socket connected: disconnect communicators"


@pytest.fixture
async def machine_nats(settings: LazySettings, prefix: str) -> AsyncIterator[str]:
    """The machine's NATS with JetStream (docs/operations.md#tests-and-ci); skipped, or failed under
    CI, when absent.

    The connection ensures a stream for this test's prefix there: it is deleted afterwards.
    """
    host, port = NATS_URL.removeprefix("nats://").split(":")
    require("NATS", host, int(port))
    settings.NATS_SERVERS = [NATS_URL]
    yield NATS_URL
    await asyncio.to_thread(connection.shutdown)
    client = await nats.connect(NATS_URL, name="kurs-test-cleanup")
    with contextlib.suppress(NotFoundError):
        await client.jetstream().delete_stream(stream_name(prefix))
    await client.close()


def serve_nats(server: NatsServer, settings: LazySettings) -> Iterator[NatsServer]:
    """`server` started, and the one this process publishes to, until the test ends."""
    server.start()
    settings.NATS_SERVERS = [server.url]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_nats(settings: LazySettings) -> Iterator[NatsServer]:
    """A plain nats-server (no JetStream) on a free port."""
    yield from serve_nats(NatsServer(port=free_port()), settings)


@pytest.fixture
def own_jetstream(settings: LazySettings, tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port, its store in this test's directory."""
    yield from serve_nats(NatsServer(port=free_port(), store_dir=tmp_path / "jetstream"), settings)


@contextlib.asynccontextmanager
async def serving(listener: socket.socket, **options: Any) -> AsyncIterator[int]:
    """uvicorn serving Kurs in this process (lifespan on) on `listener`: its port number;
    `options` go to `uvicorn.Config`."""
    import uvicorn

    from config.asgi import application

    listener.listen()
    config = uvicorn.Config(
        application, lifespan="on", log_level="warning", timeout_graceful_shutdown=5, **options
    )
    instance = uvicorn.Server(config)
    task = asyncio.create_task(instance.serve(sockets=[listener]))
    async with asyncio.timeout(10):
        while not instance.started:  # noqa: ASYNC110 - uvicorn offers no start-up event
            await asyncio.sleep(0.01)
    try:
        yield listener.getsockname()[1]
    finally:
        instance.should_exit = True
        await task


@pytest.fixture
async def asgi_server() -> AsyncIterator[int]:
    """uvicorn serving Kurs in this process (lifespan on), on a free port: its number."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    async with serving(listener) as port:
        yield port


async def connect(path: str = "/ws/items") -> WebsocketCommunicator:
    from config.asgi import application

    communicator = WebsocketCommunicator(application, path, headers=[ORIGIN])
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return communicator


async def receive(communicator: WebsocketCommunicator, wait: float = 3.0) -> dict[str, Any]:
    return json.loads(await communicator.receive_from(wait))


async def receive_until(
    communicator: WebsocketCommunicator, kind: str, wait: float = 3.0
) -> dict[str, Any]:
    """The next message of type `kind`, skipping others (e.g. ticks)."""
    while True:
        message = await receive(communicator, wait)
        if message["type"] == kind:
            return message


# `make test` runs the SQLite and PostgreSQL suites side by side: each names its own database.
REDIS_TEST_URL = os.environ.get("KURS_TEST_REDIS_REALTIME_URL", "redis://127.0.0.1:6379/5")


# The time limit of a test that starts web processes (pytest.mark.timeout), the migration of the
# web database included for the first of them: on two cores shared with other suites `migrate`
# alone has taken over two minutes, and each uvicorn process importing Django more than 30 s.
# Every step waits on its condition (the command's end, the port), so only a stuck one waits
# this out.
WEB_TEST_TIMEOUT = 480
MIGRATE_TIMEOUT = 300.0


@pytest.fixture(scope="session")
def web_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file that the web subprocesses share (their snapshot reads it)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'web.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_DEBUG": "false"}
    env.setdefault("DJANGO_SECRET_KEY", "kurs-test-secret-key-not-for-production")
    subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=REPO,
        env=env,
        check=True,
        timeout=MIGRATE_TIMEOUT,
    )
    return url


@dataclass
class WebProcess:
    """`uvicorn config.asgi:application` in a subprocess on a free port."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/items"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def web_processes(
    web_database: str, tmp_path: Path, prefix: str
) -> Iterator[Callable[..., list[WebProcess]]]:
    started: list[WebProcess] = []

    def start(count: int, *, nats_url: str, redis_url: str | None = None) -> list[WebProcess]:
        batch = []
        for n in range(count):
            port = free_port()
            env = {
                **os.environ,
                "DJANGO_DEBUG": "false",
                "DJANGO_SECRET_KEY": "kurs-test-secret-key-not-for-production",
                "DATABASE_URL": web_database,
                "NATS_URL": nats_url,
                "KURS_NATS_PREFIX": prefix,
                "KURS_INSTANCE": f"web{n}-{prefix}",
                "KURS_LOG_LEVEL": "INFO",
            }
            env.pop("REDIS_URL", None)
            if redis_url:
                env["REDIS_URL"] = redis_url
            log = tmp_path / f"web{n}.log"
            process = subprocess.Popen(
                [
                    str(REPO / ".venv" / "bin" / "uvicorn"),
                    "config.asgi:application",
                    *("--host", "127.0.0.1", "--port", str(port)),
                    *("--lifespan", "on", "--no-access-log"),
                ],
                cwd=REPO,
                env=env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            web = WebProcess(port=port, process=process, log=log)
            started.append(web)
            batch.append(web)
        for web in batch:
            try:
                wait_for_port(web.port, START_TIMEOUT, web.process)
            except TimeoutError as exc:
                raise AssertionError(f"web process: {exc}:\n{web.log.read_text()}") from None
        return batch

    yield start
    for web in started:
        web.stop()
