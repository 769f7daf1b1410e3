"""Rows written without a model instance: the owner's burst writes (docs/scaling.md#the-owner).

`bulk_create` builds a model instance per row, runs each field's `pre_save` and compiles its
SQL anew on every call: at 1,000 pairs that was most of the owner's CPU per accepted quote. An
`Insert` names a model's columns once, prepares each row's values with the columns' own fields
(`get_db_prep_save`, what `bulk_create` would send), and writes them with one statement built
once per connection vendor: on SQLite an `executemany` of it; on PostgreSQL one execution
whatever the number of rows, each column's values one binary array (`unnest`). Measured
(docs/scaling.md#the-owner), PostgreSQL's `executemany` (a statement per row, pipelined) cost
the server three times the CPU of one statement, and Django's client-side binding renders an
array as text at more cost than the whole row's preparation. With `conflict` it is an upsert:
the row whose `conflict` column matches has every other column rewritten (a write's rows each
of its own key).

Each model's `Insert` lives next to the model and writes every concrete column but an automatic
primary key: `unwritten()` names a column it would leave out (a field added to the model later),
which a test forbids. It imports nothing of the apps: any app's models may use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper

Row = Mapping[str, Any]

# Every `Insert` made (the test that each writes its model's every column walks them).
ALL: list[Insert] = []


class Insert:
    """`model`'s rows as mappings attname -> value, each value prepared by its field."""

    def __init__(
        self, model: type[models.Model], columns: Sequence[str], *, conflict: str | None = None
    ) -> None:
        self.model = model
        self.columns = tuple(columns)
        self.conflict = conflict
        self._prepared: tuple[tuple[str, Any], ...] | None = None
        self._sql: dict[str, str] = {}  # connection vendor -> the statement
        ALL.append(self)

    def unwritten(self) -> set[str]:
        """The concrete columns of the model this insert leaves out (an automatic key aside)."""
        meta = self.model._meta
        every = {
            field.attname
            for field in meta.concrete_fields
            if not (field.primary_key and isinstance(field, models.AutoField))
        }
        return every - set(self.columns)

    def prepare(
        self, row: Row, connection: BaseDatabaseWrapper, *, leading: tuple[Any, ...] = ()
    ) -> tuple[Any, ...]:
        """One row's values as the database takes them, in `columns` order (a KeyError for a
        column the row lacks: a model's new column is written on purpose, never by default).

        `leading`: the first columns' values, prepared already (a row that copies another
        insert's row with the same fields: the served log's version of a current rate)."""
        prepares = self._prepares()[len(leading) :]
        return leading + tuple(prep(row[name], connection) for name, prep in prepares)

    def write(self, rows: Iterable[Row], *, using: str = DEFAULT_DB_ALIAS) -> int:
        """Insert (or upsert) `rows` in one statement, in the current transaction."""
        connection = connections[using]
        return self.write_prepared([self.prepare(row, connection) for row in rows], using=using)

    def write_prepared(
        self, params: Sequence[tuple[Any, ...]], *, using: str = DEFAULT_DB_ALIAS
    ) -> int:
        """`write` for rows `prepare`d already (an upsert's rows each of its own key)."""
        if not params:
            return 0
        connection = connections[using]
        sql = self._sql.get(connection.vendor)
        if sql is None:
            sql = self._sql[connection.vendor] = self._statement(connection)
        if connection.vendor == "postgresql":
            with _unprepared_cursor(connection) as cursor:
                cursor.execute(sql, [list(column) for column in zip(*params, strict=True)])
        else:
            with connection.cursor() as cursor:
                cursor.executemany(sql, params)
        return len(params)

    def _field(self, attname: str) -> models.Field[Any, Any]:
        """The concrete field of a column (looked up when first written: the models are ready)."""
        return next(f for f in self.model._meta.concrete_fields if f.attname == attname)

    def _prepares(self) -> tuple[tuple[str, Any], ...]:
        if self._prepared is None:
            self._prepared = tuple(
                (name, self._field(name).get_db_prep_save) for name in self.columns
            )
        return self._prepared

    def _statement(self, connection: BaseDatabaseWrapper) -> str:
        """The INSERT: on PostgreSQL of the rows as one array per column (`unnest`, in their
        order), elsewhere of one row (`executemany`)."""
        quote = connection.ops.quote_name
        fields = [self._field(name) for name in self.columns]
        names = ", ".join(quote(field.column) for field in fields)
        if connection.vendor == "postgresql":
            # Binary arrays (`%b`), each cast to its column's type; WITH ORDINALITY keeps the
            # rows' order (an automatic key follows it: the outbox's relay order).
            arrays = ", ".join(f"%b::{field.db_type(connection)}[]" for field in fields)
            source = f"SELECT {names} FROM unnest({arrays}) WITH ORDINALITY AS rows ({names}, "
            source += f"{quote('position')}) ORDER BY {quote('position')}"
        else:
            source = f"VALUES ({', '.join(['%s'] * len(fields))})"
        sql = f"INSERT INTO {quote(self.model._meta.db_table)} ({names}) {source}"
        if self.conflict is not None:
            key = quote(self._field(self.conflict).column)
            sql += f" ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(
                f"{name} = EXCLUDED.{name}"
                for name in (quote(field.column) for field in fields)
                if name != key
            )
        return sql


class _Unprepared(psycopg.Cursor[Any]):
    """A psycopg cursor that binds its parameters on the server (Django's binds them into the
    statement's text: no binary arrays) and never makes a named prepared statement (nothing a
    transaction-mode PgBouncer would lose)."""

    def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
        return super().execute(query, params, **{**options, "prepare": False})


def _unprepared_cursor(connection: BaseDatabaseWrapper) -> Any:
    """A Django cursor (errors wrapped, queries logged, execute wrappers) over an `_Unprepared`."""
    connection.ensure_connection()
    connection.validate_thread_sharing()
    raw: Any = _Unprepared(connection.connection)
    if connection.queries_logged:
        return connection.make_debug_cursor(raw)
    return connection.make_cursor(raw)
