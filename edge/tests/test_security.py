"""edge.security's limits: reads and the operations endpoints limited by the edge, per worker
process, on both entrances; `POST /tasks/run` per API key (429 + Retry-After everywhere)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.conf import LazySettings
from django.core.cache import cache
from django.test import Client

from edge.clients import client_of
from edge.security import ReadLimiter
from edge.tests.asgi import Answer, call, counting
from items import services
from rates import fetch_control
from rates.snapshot import snapshot
from tests.services import run_python

pytestmark = pytest.mark.django_db(transaction=True)

OPS = ["/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs", "/metrics"]


@pytest.fixture(autouse=True)
def fresh_counters() -> None:
    cache.clear()


def assert_throttled(answer: Answer) -> None:
    assert answer.status == 429, answer.body
    assert answer.json() == {"detail": "too many requests"}
    retry = answer.header("Retry-After")
    assert retry is not None
    assert 1 <= int(retry) <= 60
    assert answer.header("Cache-Control") == b"no-store"


@pytest.fixture
def quick_health(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge import health

    async def ok() -> dict[str, Any]:
        return {"status": "ok"}

    monkeypatch.setattr(health, "CHECKS", {"database": ok})


@pytest.mark.usefixtures("quick_health")
@pytest.mark.parametrize("path", OPS)
async def test_the_operations_endpoints_are_limited_too(settings: LazySettings, path: str) -> None:
    settings.KURS_RATE_LIMIT = (2, 60)
    for _ in range(2):
        assert (await call(path)).status == 200
    assert_throttled(await call(path))


@pytest.mark.usefixtures("quick_health")
async def test_probes_count_apart_from_the_data_reads(settings: LazySettings) -> None:
    # A client reading hard from the probe's address does not turn the probe's answer into a 429.
    settings.KURS_RATE_LIMIT = (2, 60)
    for _ in range(2):
        assert (await call("/api/v1/items")).status == 200
    assert_throttled(await call("/api/v1/items"))
    assert (await call("/api/v1/health")).status == 200
    assert (await call("/metrics")).status == 200


async def test_reads_are_limited_per_client(settings: LazySettings) -> None:
    settings.KURS_RATE_LIMIT = (3, 60)
    for _ in range(3):
        assert (await call("/api/v1/items", client="10.0.0.1")).status == 200
    assert_throttled(await call("/api/v1/items", client="10.0.0.1"))
    # Another client has its own budget; writes count against none.
    assert (await call("/api/v1/items", client="10.0.0.2")).status == 200
    assert (await call("/api/v1/items", method="POST", client="10.0.0.1")).status == 401


async def test_a_forged_forwarded_for_does_not_buy_a_fresh_budget(
    settings: LazySettings,
) -> None:
    """KURS_NUM_PROXIES is 0 by default: the client is the TCP peer, whatever it claims."""
    settings.KURS_RATE_LIMIT = (5, 60)
    statuses = [
        (
            await call(
                "/api/v1/items",
                headers=[(b"x-forwarded-for", f"1.2.3.{n}".encode())],
                client="10.0.0.9",
            )
        ).status
        for n in range(20)
    ]
    assert statuses == [200] * 5 + [429] * 15


def test_behind_proxies_the_client_is_the_address_they_appended() -> None:
    assert client_of("10.0.0.1", "6.6.6.6, 1.2.3.4", 0) == "10.0.0.1"
    assert client_of("10.0.0.1", "6.6.6.6, 1.2.3.4", 1) == "1.2.3.4"
    assert client_of("10.0.0.1", "1.2.3.4", 2) == "1.2.3.4"
    assert client_of("10.0.0.1", None, 1) == "10.0.0.1"


async def test_a_limited_deployment_keeps_the_route_table(settings: LazySettings) -> None:
    """KURS_RATE_LIMIT no longer sends the hot reads to Django: the edge counts them itself."""
    settings.KURS_RATE_LIMIT = (2, 60)
    snapshot.reset()
    await call("/api/v1/courses")  # Django loads the snapshot once
    with counting() as django:
        answers = [await call("/api/v1/courses", client="10.0.0.3") for _ in range(3)]
    assert [answer.status for answer in answers] == [200, 200, 429]
    assert django.count == 0
    assert_throttled(answers[-1])
    snapshot.reset()


def test_the_read_window_is_counted_on_an_injected_clock() -> None:
    now = [120.0]
    limiter = ReadLimiter(clock=lambda: now[0])
    assert [limiter.wait("read", "a", (2, 60)) for _ in range(3)] == [None, None, 60.0]
    assert limiter.wait("ops", "a", (2, 60)) is None  # another budget
    now[0] = 179.5
    assert limiter.wait("read", "a", (2, 60)) == 0.5
    now[0] = 180.0  # the next window
    assert limiter.wait("read", "a", (2, 60)) is None


async def test_without_a_limit_nothing_is_counted(settings: LazySettings) -> None:
    settings.KURS_RATE_LIMIT = None
    assert {(await call("/metrics")).status for _ in range(20)} == {200}


@pytest.fixture
def cycles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`POST /tasks/run` answered by a live owner that only counts the requests."""
    asked: list[int] = []

    async def request_cycle() -> dict[str, object]:
        asked.append(1)
        return {"stored": 0, "providers": {}, "duration_ms": 1}

    monkeypatch.setattr(fetch_control, "request_cycle", request_cycle)
    return asked


def test_running_a_cycle_is_limited_per_key(
    client: Client, settings: LazySettings, cycles: list[int]
) -> None:
    settings.KURS_TASKS_RATE_LIMIT = (2, 60)
    first, second = (services.api_key_create(name=name)[1] for name in ("a", "b"))
    for _ in range(2):
        assert client.post("/api/v1/tasks/run", HTTP_X_API_KEY=first).status_code == 200
    refused = client.post("/api/v1/tasks/run", HTTP_X_API_KEY=first)
    assert refused.status_code == 429
    assert refused.json() == {"detail": "too many requests"}
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert len(cycles) == 2  # the refused request asked no exchange
    # Another key has its own budget, from the same address.
    assert client.post("/api/v1/tasks/run", HTTP_X_API_KEY=second).status_code == 200
    # A request without a key is refused for the key, and counts against nothing.
    assert client.post("/api/v1/tasks/run").status_code == 401


@pytest.mark.parametrize(("value", "expected"), [(None, "(6, 60)"), ("", "None")])
def test_the_task_limit_defaults_to_six_a_minute(value: str | None, expected: str) -> None:
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.test_settings"}
    environment.pop("KURS_TASKS_RATE_LIMIT", None)
    if value is not None:
        environment["KURS_TASKS_RATE_LIMIT"] = value  # set and empty: off
    code = "from django.conf import settings; print(settings.KURS_TASKS_RATE_LIMIT)"
    run = run_python(["-c", code], environment)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
