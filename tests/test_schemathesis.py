"""The API against its own OpenAPI, by schemathesis (`--checks all`, every phase, the stateful one
included), with and without an API key: 0 failures of any check.

A real uvicorn (`config.asgi:application`, lifespan on) serves a fresh migrated database (SQLite,
or PostgreSQL when the suite runs on it), its providers pointed at the emulator in this process,
and the schemathesis command line runs against `/api/v1/openapi.json` on 127.0.0.1 with a fixed
seed and a bounded budget. What the schema cannot say (the cross-field rules of a time range and a
pair, state-dependent answers) is in `tests/schemathesis.toml` and `tests/schemathesis_hooks.py`.
The event stream is in: schemathesis reads its first events (a bounded number, for a bounded
time: the stream never ends) and validates each against the event schema of its operation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from rates.tests.support import emulator_env, emulator_in_thread
from tests.services import ROOT, START_TIMEOUT, free_port, run_python, wait_for_port

pytestmark = [pytest.mark.timeout(240)]

SEED = 20261130
# Cases per operation and phase: ~1,000 cases a run, ~25 s each on this machine.
MAX_EXAMPLES = 12
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


@dataclass
class Served:
    url: str
    key: str
    log: Path


@contextmanager
def served_database(tmp_path: Path) -> Iterator[str]:
    """A fresh database on the suite's server (PostgreSQL when DATABASE_URL says so, else a
    SQLite file) for the served process: its DATABASE_URL. The suite's own test database stays
    untouched by what schemathesis writes."""
    suite_url = os.environ.get("DATABASE_URL", "")
    if not suite_url.startswith(("postgres://", "postgresql://")):
        yield f"sqlite:///{tmp_path / 'served.sqlite3'}"
        return
    name = f"kurs_st_{uuid.uuid4().hex[:10]}"
    server = urlsplit(suite_url)
    with psycopg.connect(suite_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(server._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(suite_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp_path = tmp_path_factory.mktemp("schemathesis")
    # Prices move every 10 s: both runs outlast CoinGecko's 120 s freshness window, and on-demand
    # lookups of still prices would turn into 503s ("rejected: stale") halfway through.
    with served_database(tmp_path) as database_url, emulator_in_thread(tick=10) as emulator:
        env = {
            **os.environ,
            **emulator_env(emulator),
            "DATABASE_URL": database_url,
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "kurs-test-secret-key-not-for-production",
            "KURS_NATS_PREFIX": f"kurst{uuid.uuid4().hex[:10]}",
            "KURS_LOG_LEVEL": "WARNING",
        }
        env.pop("REDIS_URL", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        migrated = run_python(["manage.py", "migrate", "--noinput", "-v", "0"], env, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        created = run_python(["manage.py", "create_api_key", "schemathesis"], env)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        port = free_port()
        log = tmp_path / "web.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("uvicorn")),
                    "config.asgi:application",
                    *("--host", "127.0.0.1", "--port", str(port)),
                    *("--lifespan", "on", "--no-access-log"),
                ],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(port, START_TIMEOUT, process)
            url = f"http://127.0.0.1:{port}"
            # One fetch cycle, so that latest, history and candles have rows to answer with.
            cycle = httpx.post(f"{url}/api/v1/tasks/run", headers={"X-API-Key": key}, timeout=30)
            assert cycle.status_code == 200, cycle.text
            assert cycle.json()["stored"] > 0
            yield Served(url=url, key=key, log=log)
        finally:
            process.terminate()
            process.wait(15)


def schemathesis(served: Served, tmp_path: Path, *headers: str) -> tuple[int, str]:
    """Run schemathesis; (cases generated, its output). Fails the test on any failure."""
    command = [
        SCHEMATHESIS,
        *("--config-file", str(ROOT / "tests" / "schemathesis.toml")),
        "run",
        f"{served.url}/api/v1/openapi.json",
        *("--phases", "examples,coverage,fuzzing,stateful"),
        *("--seed", str(SEED)),
        *("--max-examples", str(MAX_EXAMPLES)),
        # One worker: the budget stays the same on any machine, and hypothesis's lambda
        # descriptions are not safe across threads (an "AST recursion depth mismatch").
        *("--workers", "1"),
        *("--request-timeout", "10"),
        "--no-shrink",
        "--no-color",
        *[part for header in headers for part in ("-H", header)],
    ]
    run = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    output = run.stdout + run.stderr
    server_errors = [line for line in served.log.read_text().splitlines() if "Traceback" in line]
    assert run.returncode == 0, output[-20000:]
    assert not server_errors, served.log.read_text()[-5000:]
    counted = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counted is not None, output[-3000:]
    generated, passed = int(counted.group(1)), int(counted.group(2))
    assert generated == passed
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅\s+{phase}", output), f"phase {phase} did not pass:\n{output}"
    print(f"schemathesis {'with' if headers else 'without'} a key: {generated} cases, 0 failures")
    return generated, output


def test_the_api_keeps_its_openapi_with_a_key(served: Served, tmp_path: Path) -> None:
    generated, output = schemathesis(served, tmp_path, f"X-API-Key: {served.key}")
    assert generated > 500
    # With the key, the writes were exercised for real (the stateful phase links them).
    assert "API Links" in output


def test_the_api_keeps_its_openapi_without_a_key(served: Served, tmp_path: Path) -> None:
    generated, _ = schemathesis(served, tmp_path)
    assert generated > 500
