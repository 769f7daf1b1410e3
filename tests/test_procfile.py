"""The Procfile's processes as `make run` and `make demo` start them, under honcho.

Each test starts the real process set (a migrated SQLite database of its own, the machine's NATS
under a private subject prefix) and checks what a user sees in the terminal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest

from tests.procs import Honcho, plain_env
from tests.services import ROOT, START_TIMEOUT, free_port, wait_for_port

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A plain shell's environment on a freshly migrated SQLite database, DEBUG as `make run`."""
    tmp = tmp_path_factory.mktemp("procfile")
    env = plain_env(
        DJANGO_DEBUG="true",
        DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        KURS_NATS_PREFIX=f"kursprocfile{os.getpid()}",
        KURS_SHARED_CACHE_DIR=str(tmp / "cache"),
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
    )
    return env


@pytest.fixture
def honchos() -> Iterator[list[Honcho]]:
    started: list[Honcho] = []
    yield started
    for honcho in started:
        honcho.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message]:
    """Status and headers (looked up case-insensitively: servers spell them differently)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_the_web_process_logs_each_request_once_in_json_with_iso_utc_ts_and_request_id(
    env: dict[str, str], honchos: list[Honcho]
) -> None:
    port = free_port()
    web = Honcho(["web"], {**env, "KURS_PORT": str(port), "KURS_LOG_FORMAT": "json"})
    honchos.append(web)
    wait_for_port(port, START_TIMEOUT, web.process)

    status, headers = get(
        f"http://127.0.0.1:{port}/api/v1/no-such-thing", {"X-Request-ID": "newcomer-0001"}
    )
    assert status == 404
    assert headers["X-Request-ID"] == "newcomer-0001"
    status, headers = get(f"http://127.0.0.1:{port}/api/v1/no-such-thing?second")
    generated = headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    web.wait_for_line(generated, 10)
    web.ctrl_c()

    lines = [line for line in web.output_of("web") if "/api/v1/no-such-thing" in line]
    assert len(lines) == 2, lines  # two requests, one line each
    first, second = (json.loads(line) for line in lines)
    assert ISO_UTC.match(first["ts"]), first["ts"]
    assert first["request_id"] == "newcomer-0001"
    assert first["status"] == 404
    assert second["request_id"] == generated


def test_qcluster_stops_within_honchos_grace_on_ctrl_c(
    env: dict[str, str], honchos: list[Honcho]
) -> None:
    # honcho stops a process with SIGTERM to its whole process group, then SIGKILL after 5 s.
    qcluster = Honcho(["qcluster"], env)
    honchos.append(qcluster)
    qcluster.wait_for_line(r"Q Cluster \S+ \[\S+\] running", 60)

    qcluster.ctrl_c()

    output = "\n".join(qcluster.lines)
    # Not timed here: honcho itself sends SIGKILL (and says so) once its grace has passed.
    assert "SIGKILL" not in output, output
    assert re.search(r"Q Cluster \S+ has stopped", output), output
    assert "qcluster.1 stopped (rc=0)" in output


def test_the_demo_fetcher_waits_for_the_emulator_before_its_first_cycle(
    env: dict[str, str], honchos: list[Honcho], tmp_path: Path
) -> None:
    port = free_port()
    emulator_url = f"127.0.0.1:{port}"
    fetcher = Honcho(
        ["fetcher"],
        {
            **env,
            # What scripts/start.sh sets for `make demo`:
            "KURS_WAIT_FOR": emulator_url,
            "KURS_PROVIDERS": "binance",
            "KURS_BINANCE_REST_URL": f"http://{emulator_url}/binance",
            "KURS_BINANCE_WS_URL": f"ws://{emulator_url}/binance",
            "KURS_POLL_INTERVAL": "1",
        },
    )
    honchos.append(fetcher)
    fetcher.wait_for_line(f"waiting for {re.escape(emulator_url)}", 30)
    emulator = subprocess.Popen(
        [sys.executable, "manage.py", "run_emulator", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first_cycle = fetcher.wait_for_line(r"cycle", 60)
        fetcher.ctrl_c()
    finally:
        emulator.terminate()
        emulator.wait(10)

    assert "binance ok" in first_cycle
    before = fetcher.output_of("fetcher")
    errors = [line for line in before if "cannot reach" in line or "WARNING" in line]
    assert errors == []
