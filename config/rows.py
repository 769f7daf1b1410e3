"""Rows written without a model instance: the owner's burst writes (docs/scaling.md#the-owner).

`bulk_create` builds a model instance per row, runs each field's `pre_save` and compiles its
SQL anew on every call: at 1,000 pairs that was most of the owner's CPU per accepted quote. An
`Insert` names a model's columns once, prepares each row's values with the columns' own fields
(`get_db_prep_save`, what `bulk_create` would send), and writes them with one `executemany` of
one statement compiled once per connection vendor. With `conflict` it is an upsert: the row
whose `conflict` column matches has every other column rewritten (PostgreSQL and SQLite alike).

Each model's `Insert` lives next to the model and writes every concrete column but an automatic
primary key: `unwritten()` names a column it would leave out (a field added to the model later),
which a test forbids. It imports nothing of the apps: any app's models may use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
        """Insert (or upsert) `rows` in one `executemany`, in the current transaction."""
        connection = connections[using]
        return self.write_prepared([self.prepare(row, connection) for row in rows], using=using)

    def write_prepared(
        self, params: Sequence[tuple[Any, ...]], *, using: str = DEFAULT_DB_ALIAS
    ) -> int:
        """`write` for rows `prepare`d already."""
        if params:
            connection = connections[using]
            with connection.cursor() as cursor:
                cursor.executemany(self._statement(connection), params)
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
        sql = self._sql.get(connection.vendor)
        if sql is None:
            quote = connection.ops.quote_name
            names = [quote(self._field(name).column) for name in self.columns]
            sql = (
                f"INSERT INTO {quote(self.model._meta.db_table)} ({', '.join(names)}) "
                f"VALUES ({', '.join(['%s'] * len(names))})"
            )
            if self.conflict is not None:
                key = quote(self._field(self.conflict).column)
                updated = [name for name in names if name != key]
                sql += f" ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(
                    f"{name} = EXCLUDED.{name}" for name in updated
                )
            self._sql[connection.vendor] = sql
        return sql
