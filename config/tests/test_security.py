"""config.security's limits: the operations endpoints and `POST /tasks/run` (429 + Retry-After)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client

from items import services
from rates import fetch_control
from tests.services import run_python

pytestmark = pytest.mark.django_db

OPS = ["/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs", "/metrics"]


@pytest.fixture(autouse=True)
def fresh_counters() -> None:
    cache.clear()


def assert_throttled(response: Any) -> None:
    assert response.status_code == 429, response.content
    assert response.json() == {"detail": "too many requests"}
    assert 1 <= int(response["Retry-After"]) <= 60
    assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize("path", OPS)
def test_the_operations_endpoints_are_limited_too(client: Client, settings: Any, path: str) -> None:
    settings.KURS_RATE_LIMIT = (2, 60)
    for _ in range(2):
        assert client.get(path).status_code in (200, 503)  # health is 503 without NATS
    assert_throttled(client.get(path))


def test_probes_count_apart_from_the_data_reads(client: Client, settings: Any) -> None:
    # A client reading hard from the probe's address does not turn the probe's answer into a 429.
    settings.KURS_RATE_LIMIT = (2, 60)
    for _ in range(2):
        assert client.get("/api/v1/items").status_code == 200
    assert_throttled(client.get("/api/v1/items"))
    assert client.get("/api/v1/health").status_code in (200, 503)
    assert client.get("/metrics").status_code == 200


def test_without_a_limit_nothing_is_counted(client: Client, settings: Any) -> None:
    settings.KURS_RATE_LIMIT = None
    assert all(client.get("/metrics").status_code == 200 for _ in range(20))


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
    client: Client, settings: Any, cycles: list[int]
) -> None:
    settings.KURS_TASKS_RATE_LIMIT = (2, 60)
    first, second = (services.api_key_create(name=name)[1] for name in ("a", "b"))
    for _ in range(2):
        assert client.post("/api/v1/tasks/run", HTTP_X_API_KEY=first).status_code == 200
    assert_throttled(client.post("/api/v1/tasks/run", HTTP_X_API_KEY=first))
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
