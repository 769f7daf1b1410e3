"""`manage.py run_fetch` (docs/rates.md#fetching): table/JSON, exit codes, --provider, --watch."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import SyncToAsync
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.db import connections

from items.models import Item
from rates.emulator import EmulatorServer
from rates.lease import Lease
from rates.models import Rate
from rates.tests.support import PROVIDERS, emulator_env, emulator_in_thread, point_settings_at

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("rate_settings", "fresh_board"),
]

ROOT = Path(django_settings.BASE_DIR)


@pytest.fixture
def emulator(settings: Any) -> Iterator[EmulatorServer]:
    with emulator_in_thread() as server:
        point_settings_at(settings, server)
        yield server


@pytest.fixture(autouse=True)
def default_items() -> None:
    """The eight seeded pairs (a transactional test flushes the migration's seed)."""
    for base in ("BTC", "ETH", "USDTTRC", "USDTERC"):
        for quote in ("RUB", "USD"):
            Item.objects.get_or_create(base=base, quote=quote)


@pytest.fixture(autouse=True)
def close_worker_connections() -> Iterator[None]:
    """The command's sync_to_async calls use asgiref's worker thread: close its connection."""
    yield
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


def run_fetch(*args: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("run_fetch", *args, stdout=out)
    except SystemExit as exc:
        return int(exc.code or 0), out.getvalue()
    return 0, out.getvalue()


def test_it_prints_a_table_of_pair_value_provider_and_age_and_exits_0(
    emulator: EmulatorServer,
) -> None:
    emulator.market.books["binance"].set("BTCUSDT", Decimal("91234.5"))
    code, out = run_fetch()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["pair", "value", "provider", "age"]
    table = {line.split()[0]: line.split() for line in lines[1:9]}
    assert table["BTC-USD"][1:3] == ["91234.5", "binance"]
    assert table["BTC-USD"][3].endswith("s")
    assert table["BTC-RUB"][2] == "coingecko"
    for name in PROVIDERS:
        assert f"{name}: ok" in lines
    assert Rate.objects.exists()


def test_it_exits_1_when_no_provider_returns_valid_quotes(emulator: EmulatorServer) -> None:
    emulator.set_fault("all", "down")
    code, out = run_fetch()
    assert code == 1
    assert "binance: error: HTTP 503" in out
    assert not Rate.objects.exists()


def test_json_output_is_machine_readable(emulator: EmulatorServer) -> None:
    emulator.set_fault("coingecko", "garbage")
    code, out = run_fetch("--json")
    assert code == 0
    report = json.loads(out, parse_float=Decimal)
    assert set(report) == {"stored", "providers", "duration_ms", "ok", "rates"}
    assert report["ok"] is True
    assert report["providers"]["coingecko"].startswith("error: ")
    rates = {row["pair"]: row for row in report["rates"]}
    assert rates["BTC-USD"]["provider"] == "binance"
    assert isinstance(rates["BTC-USD"]["value"], int | Decimal)  # a JSON number, not a string
    assert rates["BTC-RUB"] == {  # coingecko is broken, so BTC-RUB is binance × cbr
        "pair": "BTC-RUB",
        "value": rates["BTC-RUB"]["value"],
        "provider": "binance+cbr",
        "age_s": rates["BTC-RUB"]["age_s"],
        "derived": True,
    }


def test_provider_limits_the_cycle_to_one_provider(emulator: EmulatorServer) -> None:
    code, out = run_fetch("--json", "--provider", "bybit")
    assert code == 0
    report = json.loads(out)
    assert list(report["providers"]) == ["bybit"]
    assert set(Rate.objects.values_list("provider", flat=True)) == {"bybit"}


def test_provider_prints_only_the_rows_that_provider_serves(emulator: EmulatorServer) -> None:
    """The stored rates (CoinGecko's BTC-RUB, CBR's cross legs) are not Binance's: after a full
    cycle, `--provider binance` lists Binance's quotes and cross rates of Binance's legs only."""
    assert run_fetch()[0] == 0  # every provider's rates stored, as a live owner would have
    code, out = run_fetch("--json", "--provider", "binance")
    assert code == 0
    rows = {row["pair"]: row for row in json.loads(out, parse_float=Decimal)["rates"]}
    assert rows["BTC-USD"]["provider"] == "binance"
    assert all(set(row["provider"].split("+")) == {"binance"} for row in rows.values()), rows
    assert "BTC-RUB" not in rows  # CoinGecko's or Binance × CBR: nothing Binance alone prices
    code, table = run_fetch("--provider", "binance")
    assert code == 0
    listed = [line.split() for line in table.split("\n\n")[0].splitlines()[1:]]
    assert {line[0] for line in listed} == set(rows)
    assert {line[2] for line in listed} == {"binance"}


def test_a_one_shot_cycle_beside_a_live_owner_says_nothing_of_failing_over(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """It stores nothing, so it fails nothing over: Binance's error is reported, once."""
    assert Lease(holder="the-live-owner").try_acquire()
    emulator.set_fault("binance", "down")
    caplog.set_level(logging.DEBUG, logger="rates")
    code, out = run_fetch()
    assert code == 0  # bybit and the others answered
    assert "binance: error: HTTP 503" in out
    assert not Rate.objects.exists()
    lines = [record.getMessage() for record in caplog.records]
    assert "a live fetcher owns rates: this cycle only quotes, it stores nothing" in lines
    assert not [line for line in lines if "failing over" in line or "failover" in line]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [line for line in warnings if line.startswith("binance")] == [
        "binance failing: HTTP 503 from 127.0.0.1:"
        + out.split("binance: error: HTTP 503 from 127.0.0.1:")[1].split("\n")[0]
        + " (logged again when it answers; failures until then at DEBUG)"
    ]


def test_an_unknown_provider_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match=r"--provider: unknown provider 'kraken' \(known: "):
        call_command("run_fetch", "--provider", "kraken")


def test_unreachable_exchanges_are_reported_not_fatal(settings: Any) -> None:
    settings.KURS_PROVIDER_URLS = {
        name: {"rest": "http://127.0.0.1:9/" + name, "ws": None} for name in PROVIDERS
    }
    code, out = run_fetch()
    assert code == 1
    assert "binance: error: cannot reach" in out


def test_watch_runs_until_sigterm_and_logs_one_summary_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_DEBUG": "true",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'kurs.sqlite3'}",
        "KURS_POLL_INTERVAL": "0.2",
        "KURS_LOG_LEVEL": "INFO",
        "NATS_URL": "nats://127.0.0.1:9",  # nothing there: events fall back, never block
    }
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, check=True, timeout=60)
    with emulator_in_thread() as server:
        env.update(emulator_env(server))
        process = subprocess.Popen(
            [*manage, "run_fetch", "--watch"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert process.stdout is not None
            seen = []
            for line in process.stdout:  # ends when the process closes its output
                seen.append(line)
                if "cycle:" in line and "binance ok" in line:
                    process.send_signal(signal.SIGTERM)
                    break
            rest, _ = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
    output = "".join(seen) + rest
    assert process.returncode == 0, output
    summaries = [line for line in output.splitlines() if "run_fetch stopped after" in line]
    assert len(summaries) == 1
    assert "rates stored" in summaries[0]
    assert "Traceback" not in output
