"""The fetcher's provider status reaches a web process through the shared cache (no Redis)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import caches

from rates import provider_health
from rates.board import QuoteBoard
from rates.provider_health import STATUS_KEY, flush_statuses, monitor_for, provider_statuses
from tests.services import free_port, real_settings_environment, run_python

WRITER = """
import django
django.setup()
from rates.provider_health import monitor_for
monitor = monitor_for("bybit")
monitor.failed("HTTP 503 from /v5/market/tickers", kind="http")
monitor.stream_state("streaming", "connected")
monitor.flush()
"""

READER = """
import json, django
django.setup()
from rates.provider_health import provider_statuses
print(json.dumps(provider_statuses()))
"""


def cut_off_the_shared_cache(settings: Any) -> None:
    """The shared cache is a Redis that nobody listens for: every call to it fails at once."""
    settings.CACHES = {
        **settings.CACHES,
        "shared": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
        },
    }


def test_a_web_process_sees_the_fetchers_provider_status(tmp_path: Path) -> None:
    # The real settings: local-memory default cache, file-backed shared cache.
    environment = real_settings_environment(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}", shared_cache_dir=tmp_path / "cache"
    )
    writer = run_python(["-c", WRITER], environment)
    assert writer.returncode == 0, writer.stderr
    reader = run_python(["-c", READER], environment)
    assert reader.returncode == 0, reader.stderr
    statuses = {status["name"]: status for status in json.loads(reader.stdout)}
    assert statuses["bybit"]["last_error"] == "HTTP 503 from /v5/market/tickers"
    assert statuses["bybit"]["errors_5m"] == 1
    assert statuses["bybit"]["streaming"] is True
    assert statuses["binance"]["last_error"] is None
    assert statuses["binance"]["last_error_at"] is None
    failed_at = datetime.fromisoformat(statuses["bybit"]["last_error_at"])
    assert abs((datetime.now(UTC) - failed_at).total_seconds()) < 60


def test_with_the_shared_cache_unreachable_the_last_statuses_read_are_answered(
    settings: Any,
) -> None:
    """A Redis outage: `/providers` and health answer what this process last read, never 500."""
    caches["shared"].set(
        STATUS_KEY.format(name="binance"), {"state": "open", "last_error": "HTTP 503"}, None
    )
    assert provider_statuses()[0]["state"] == "open"
    cut_off_the_shared_cache(settings)
    statuses = provider_statuses()
    assert [status["name"] for status in statuses] == list(settings.KURS_PROVIDERS)
    assert (statuses[0]["state"], statuses[0]["last_error"]) == ("open", "HTTP 503")


def fetcher_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "rates.fetcher"]


# What a shared-cache outage says: saving (the fetcher, at every flush) and reading (the web
# process, at every `/providers` and health call), each once when it starts and once when it ends.
OUTAGE_LINES = {
    "save": (
        "cannot save provider statuses",
        "provider statuses are saved to the shared cache again",
    ),
    "read": (
        "provider statuses: the shared cache is unreachable",
        "provider statuses are read from the shared cache again",
    ),
}


@pytest.mark.parametrize("use", ["save", "read"])
def test_a_shared_cache_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    settings: Any, fresh_board: QuoteBoard, caplog: pytest.LogCaptureFixture, use: str
) -> None:
    act = flush_statuses if use == "save" else provider_statuses
    notice = {"save": "status_saving", "read": "status_reading"}[use]
    starts, ends = OUTAGE_LINES[use]
    working = settings.CACHES
    for name in ("binance", "bybit"):
        monitor_for(name).failed("HTTP 503", kind="http")
    caplog.clear()  # the providers' own failures are said too: this test is about the cache
    cut_off_the_shared_cache(settings)
    with caplog.at_level(logging.INFO, logger="rates.fetcher"):
        act()
        assert getattr(provider_health, notice).failing
        act()  # the next poll or request: both providers fail again, and nothing is said
        act()
        [outage] = fetcher_logs(caplog)
        assert outage.levelname == "WARNING"
        assert outage.getMessage().startswith(starts)
        settings.CACHES = working
        act()
        act()
    [outage, recovery] = fetcher_logs(caplog)
    assert recovery.levelname == "INFO"
    assert recovery.getMessage() == ends
    assert not getattr(provider_health, notice).failing
    if use == "save":
        saved = caches["shared"].get(STATUS_KEY.format(name="bybit"))
        assert (saved["name"], saved["last_error"]) == ("bybit", "HTTP 503")
