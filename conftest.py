"""Repo-wide fixtures. Test settings live in `config/test_settings.py`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def published_events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every (subject, envelope) that `realtime.events.publish` hands to its transports."""
    from realtime import events

    seen: list[tuple[str, dict[str, Any]]] = []

    def probe(subject: str, envelope: dict[str, Any]) -> None:
        seen.append((subject, envelope))

    events.add_transport(probe)
    try:
        yield seen
    finally:
        events.remove_transport(probe)


# Modules whose servers use a database of their own choosing (a SQLite file, or a PostgreSQL
# database they create), or none, whatever the suite's DATABASE_URL: they prove the same thing on
# both runs of `make test`, so the PostgreSQL run leaves them to the SQLite one
# (docs/operations.md#tests-and-ci). A module whose processes follow DATABASE_URL is not here.
SUITE_DATABASE_UNUSED = frozenset(
    {
        "tests/test_readme.py",  # `make run` in a fresh copy: SQLite by default
        "tests/test_procfile.py",  # honcho with a SQLite file
        "tests/test_serve.py",  # scripts/serve.sh on a SQLite file
        "tests/test_ws_abuse.py",  # a web process on a SQLite file
        "tests/test_live_owner.py",  # tests/stack.py on SQLite
        "tests/test_metrics_port.py",  # tests/stack.py on SQLite
        "tests/test_client.py",  # the Python client against tests/stack.py on SQLite
        "tests/test_faults.py",  # its own PostgreSQL database in both runs
        "tests/test_alerts.py",  # promtool on deploy/alerts*.yml
        "tests/test_grafana_dashboard.py",  # the dashboard JSON against exported metric names
        "tests/test_deploy.py",  # compose and nginx files
        "tests/test_docs_page.py",  # the OpenAPI document and its page
        "realtime/tests/test_dashboard.py",  # web processes on a SQLite file
        "rates/tests/test_provider_status_shared.py",  # processes on a SQLite file
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        return
    root = Path(str(config.rootpath))
    kept: list[pytest.Item] = []
    left: list[pytest.Item] = []
    for item in items:
        module = Path(str(item.path)).relative_to(root).as_posix()
        (left if module in SUITE_DATABASE_UNUSED else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
