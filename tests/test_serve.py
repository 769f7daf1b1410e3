"""The production server as `make run` starts it (`scripts/serve.sh`): HTTP, the `/courses` fast
path, WebSocket, lifespan (the NATS bridge), Kurs's request limits (edge/serverprotocol.py)
and a graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Origin

from tests.services import ROOT, START_TIMEOUT, NatsServer, free_port, wait_for_port

WORKERS = 2  # scripts/serve.sh's default
# A bound on waiting for the shutdown, not its measure: whether it kept within uvicorn's
# --timeout-graceful-shutdown (10 s), uvicorn says (it logs the tasks it had to cancel).
SHUTDOWN_WAIT_S = 60.0


def wait_for_log(log: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{text!r} not logged {count}x within {timeout} s:\n{log.read_text()}"
            )
        time.sleep(0.05)


@pytest.fixture
def nats_url() -> Iterator[str]:
    """A nats-server of this test's own: the machine's keeps no trace of the run."""
    nats_server = NatsServer(port=free_port())
    nats_server.start()
    try:
        yield nats_server.url
    finally:
        nats_server.stop()


@pytest.fixture
def server(tmp_path: Path, nats_url: str) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KURS_RATE_LIMIT")},
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": "kurs-test-secret-key-not-for-production",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'web.sqlite3'}",
        "NATS_URL": nats_url,
        "KURS_LOG_LEVEL": "INFO",
        "KURS_SHARED_CACHE_DIR": str(tmp_path / "cache"),
    }
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
    )
    port = free_port()
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "serve.sh")],
            cwd=ROOT,
            env={**env, "KURS_PORT": str(port), "KURS_WEB_WORKERS": str(WORKERS)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, START_TIMEOUT, process)
        yield process, port, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def test_it_serves_http_and_websockets_starts_the_bridge_and_stops_cleanly_on_sigterm(
    server: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, log = server
    # Lifespan: every worker started its bridge (NATS subscriptions, snapshot loaded).
    await asyncio.to_thread(wait_for_log, log, "bridge: started on", WORKERS, 60.0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        courses = await client.get("/api/v1/courses")
        assert courses.status_code == 200
        assert courses.json()["courses"] == []  # a fresh database: no course quoted yet
        etag = courses.headers["etag"]
        again = await client.get("/api/v1/courses", headers={"If-None-Match": etag})
        assert (again.status_code, again.content) == (304, b"")
        assert "content-length" not in again.headers  # RFC 9110 8.6: not a misleading 0
        # HEAD is GET without the body, with GET's length (not 405).
        head = await client.head("/api/v1/courses")
        assert (head.status_code, head.content) == (200, b"")
        assert (head.headers["content-length"], head.headers["etag"]) == (
            str(len(courses.content)),
            etag,
        )
        item = await client.get("/api/v1/items/1")
        assert item.status_code == 200
        assert item.json()["code"]

    # Kurs's protocol is the one serving: too many headers, or one of 1 MB, are refused with 431
    # (the timeouts are tested with an injected clock in edge/tests/test_serverprotocol.py).
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(1000))
    huge = b"X-Big: " + b"x" * 1024 * 1024 + b"\r\n"
    for extra in (many, huge):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer

    origin = Origin(f"http://127.0.0.1:{port}")
    ws = await ws_connect(f"ws://127.0.0.1:{port}/ws/items", origin=origin)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "snapshot"

    process.send_signal(signal.SIGTERM)
    # The socket is told the service restarts (1012), so clients reconnect, not a dropped line.
    await asyncio.wait_for(ws.wait_closed(), SHUTDOWN_WAIT_S)
    assert ws.close_code == 1012
    code = await asyncio.to_thread(process.wait, SHUTDOWN_WAIT_S)
    assert code == 0
    # Within the graceful shutdown: nothing was left running for uvicorn to cancel.
    assert "graceful shutdown exceeded" not in log.read_text()
    # Lifespan shutdown ran in every worker: the NATS connection was drained and closed.
    assert log.read_text().count("nats: closed") == WORKERS
