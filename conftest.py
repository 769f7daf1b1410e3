"""Repo-wide fixtures. Test settings live in `config/test_settings.py`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's test databases; before they are dropped, the sessions tests left open
    outside the main thread (pytest-django closes only the main thread's), since PostgreSQL
    refuses to drop a database with another session (a warning, and the database left)."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    yield
    # The threads that would connect again: the NATS connection's (its outbox relay writes its
    # books each second), and the served log's seq recorder (it keeps its connection while acks
    # keep coming, and closes it once they are written).
    from rates.servedlog import seq_recorder
    from realtime.nats import connection as nats_connection

    nats_connection.shutdown()
    seq_recorder.wait_idle(10)
    # Async tests read the database on asgiref's one sync thread (`sync_to_async`): from a loop of
    # its own in the main thread, outside any `async_to_sync`, `sync_to_async` runs there too.
    asyncio.run(sync_to_async(connections.close_all)())
    # The last resort, for sessions nobody can close any more: the owner's off-loop calls
    # (`thread_sensitive=False`: lease renewals, shard takes) run in the pool threads of each
    # async test's loop, which end with the test and leave their connections to the garbage
    # collector (rates/tests/test_fetcher.py leaves a few). Whatever of this run is still
    # connected to a test database now is ended by PostgreSQL.
    with django_db_blocker.unblock():
        for alias in connections:
            database = connections[alias]
            if database.vendor != "postgresql":
                continue
            with database.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            database.close()


@pytest.fixture
def published_events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every (subject, envelope) that `realtime.events.publish` hands to its transports."""
    from realtime import events

    seen: list[tuple[str, dict[str, Any]]] = []

    def probe(subject: str, envelope: dict[str, Any], payload: str) -> None:
        seen.append((subject, envelope))

    events.add_transport(probe)
    try:
        yield seen
    finally:
        events.remove_transport(probe)


# Modules whose servers use a database of their own choosing (a SQLite file, or a PostgreSQL
# database they create), or none, whatever the suite's DATABASE_URL: they prove the same thing on
# either run of `make test`, so each runs in one of them, the one named here, and the two runs
# (side by side) take about as long (docs/operations.md#tests-and-ci). `KURS_SUITE_RUN` (`sqlite`
# or `postgres`, set by the Makefile's targets) says which run this is; without it, as when a
# developer runs a file, everything asked for runs. A module whose processes follow
# DATABASE_URL is not here.
ONE_RUN = {
    "tests/test_readme.py": "sqlite",  # `make run` in a fresh copy: SQLite by default
    "tests/test_procfile.py": "sqlite",  # honcho with a SQLite file
    "tests/test_serve.py": "sqlite",  # scripts/serve.sh on a SQLite file
    "tests/test_ws_abuse.py": "sqlite",  # a web process on a SQLite file
    "tests/test_alerts.py": "sqlite",  # promtool on deploy/alerts*.yml
    "tests/test_grafana_dashboard.py": "sqlite",  # the dashboard JSON against metric names
    "tests/test_deploy.py": "sqlite",  # compose and nginx files
    "tests/test_docs_page.py": "sqlite",  # the OpenAPI document and its page
    "realtime/tests/test_dashboard.py": "sqlite",  # web processes on a SQLite file
    "rates/tests/test_provider_status_shared.py": "sqlite",  # processes on a SQLite file
    "tests/test_faults.py": "postgres",  # its own PostgreSQL database in either run
    "tests/test_live_owner.py": "postgres",  # tests/stack.py on SQLite
    "tests/test_metrics_port.py": "postgres",  # tests/stack.py on SQLite
    "tests/test_client.py": "postgres",  # the Python client against tests/stack.py on SQLite
    "tests/test_pegs_live.py": "postgres",  # tests/stack.py on SQLite
    "tests/test_no_lost_event.py": "postgres",  # tests/stack.py on SQLite
    "tests/test_sharded_owner.py": "postgres",  # tests/stack.py on SQLite and on its own database
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run = os.environ.get("KURS_SUITE_RUN")
    if not run:
        return
    root = Path(str(config.rootpath))
    kept: list[pytest.Item] = []
    left: list[pytest.Item] = []
    for item in items:
        module = Path(str(item.path)).relative_to(root).as_posix()
        (left if ONE_RUN.get(module, run) != run else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
