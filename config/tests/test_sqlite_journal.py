"""SQLite runs in WAL mode with synchronous=NORMAL (config/settings.py), and that is safe for the
readers: a connection a web thread keeps between requests sees every commit of the fetcher's
connection, never a snapshot from before it (a WAL read snapshot lasts one statement in Django's
autocommit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import LazySettings
from django.db.utils import ConnectionHandler


def test_a_kept_reader_connection_sees_every_commit(
    tmp_path: Path, settings: LazySettings, django_db_blocker: Any
) -> None:
    default = settings.DATABASES["default"]
    if default["ENGINE"] != "django.db.backends.sqlite3":
        pytest.skip("SQLite's journal mode")
    db = {**default, "NAME": str(tmp_path / "wal.sqlite3"), "TEST": {}}
    reader_handler, writer_handler = (
        ConnectionHandler({"default": db}),
        ConnectionHandler({"default": db}),
    )
    reader, writer = reader_handler["default"], writer_handler["default"]
    # Its own file and connections, not the test database: pytest-django's guard lets them be.
    with django_db_blocker.unblock():
        _write_and_read(writer, reader, reader_handler, writer_handler)


def _write_and_read(writer: Any, reader: Any, *handlers: ConnectionHandler) -> None:
    try:
        with writer.cursor() as cursor:
            cursor.execute("CREATE TABLE rate (version integer)")
            cursor.execute("INSERT INTO rate VALUES (0)")
        with reader.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            assert cursor.fetchone() == ("wal",)
            cursor.execute("PRAGMA synchronous")
            assert cursor.fetchone() == (1,)  # NORMAL
        for version in range(1, 51):
            with writer.cursor() as cursor:  # as the fetcher: one IMMEDIATE transaction a write
                cursor.execute("BEGIN IMMEDIATE")
                cursor.execute("UPDATE rate SET version = %s", [version])
                cursor.execute("COMMIT")
            with reader.cursor() as cursor:  # the same open connection each time
                cursor.execute("SELECT version FROM rate")
                assert cursor.fetchone() == (version,)
    finally:
        for handler in handlers:
            handler.close_all()
