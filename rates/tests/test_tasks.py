"""django-q2 (docs/rates.md#fetching): schedules exist after migrate; a real qcluster fetches."""

from __future__ import annotations

import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.apps import apps
from django.conf import settings
from django.db import connection
from django_q.models import Schedule

from rates import tasks
from rates.tests.support import emulator_env, emulator_in_thread

ROOT = Path(settings.BASE_DIR)
schedules_migration = importlib.import_module("rates.migrations.0002_schedules")


@pytest.mark.django_db
def test_the_schedules_exist_after_migrate() -> None:
    fetch = Schedule.objects.get(name="rates.fetch_rates")
    assert (fetch.func, fetch.schedule_type, fetch.minutes, fetch.repeats) == (
        "rates.tasks.fetch_rates",
        Schedule.MINUTES,
        1,
        -1,
    )
    prune = Schedule.objects.get(name="rates.prune_history")
    assert (prune.func, prune.schedule_type, prune.repeats) == (
        "rates.tasks.prune_history",
        Schedule.DAILY,
        -1,
    )
    assert settings.Q_CLUSTER["catch_up"] is False
    assert settings.Q_CLUSTER["timeout"] < settings.Q_CLUSTER["retry"]


@pytest.mark.django_db
def test_creating_the_schedules_again_changes_nothing() -> None:
    Schedule.objects.filter(name="rates.fetch_rates").update(minutes=5)
    schedules_migration.create_schedules(apps, connection.schema_editor())
    schedules_migration.create_schedules(apps, connection.schema_editor())
    assert Schedule.objects.filter(name__startswith="rates.").count() == 2
    assert Schedule.objects.get(name="rates.fetch_rates").minutes == 1


def test_the_scheduled_functions_are_the_tasks() -> None:
    for name in ("fetch_rates", "prune_history"):
        module, _, function = schedules_migration.SCHEDULES[f"rates.{name}"]["func"].rpartition(".")
        assert getattr(importlib.import_module(module), function) is getattr(tasks, name)


def wait_for(query: str, database: Path, *, within: float) -> list[tuple[object, ...]]:
    """Rows of `query` on the cluster's database once there are any (or fail after `within`)."""
    deadline = time.monotonic() + within
    while True:
        with sqlite3.connect(database, timeout=5) as db:
            rows = db.execute(query).fetchall()
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_a_real_qcluster_runs_the_scheduled_fetch_and_stores_rates(tmp_path: Path) -> None:
    database = tmp_path / "kurs.sqlite3"  # a file: the cluster is another process
    env = {
        **os.environ,
        "DJANGO_DEBUG": "true",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"sqlite:///{database}",
        "NATS_URL": "nats://127.0.0.1:9",  # nothing there: events fall back, never block
        "KURS_LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)  # the ORM broker, as by default
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, check=True, timeout=60)
    with emulator_in_thread() as emulator:
        env.update(emulator_env(emulator))
        cluster = subprocess.Popen(
            [*manage, "qcluster"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # The cluster's guard only calls the scheduler every 30 s; run that same scheduler
            # call once now, so the due schedules are queued at once. The cluster executes them.
            subprocess.run(
                [
                    *manage,
                    "shell",
                    "-c",
                    "from django_q.brokers import get_broker; "
                    "from django_q.scheduler import scheduler; scheduler(broker=get_broker())",
                ],
                env=env,
                check=True,
                timeout=60,
            )
            done = wait_for(
                "SELECT func, success, result FROM django_q_task "
                "WHERE func = 'rates.tasks.fetch_rates'",
                database,
                within=60,
            )
            stored = wait_for("SELECT provider FROM rates_rate", database, within=5)
        finally:
            cluster.send_signal(signal.SIGTERM)
            try:
                output, _ = cluster.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                cluster.kill()
                output, _ = cluster.communicate()
    assert done, f"the cluster ran no fetch_rates task:\n{output}"
    ((_, success, _),) = done
    assert success == 1, output
    assert {provider for (provider,) in stored} >= {"binance", "bybit", "coingecko"}
