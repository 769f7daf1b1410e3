"""An exact decimal column on every backend.

PostgreSQL's NUMERIC is exact. SQLite has no decimal type: Django's DecimalField lands in a
NUMERIC-affinity column that SQLite converts to a 15-digit REAL, so 54001.123456789012345678
would come back rounded. On SQLite this field stores the fixed-point text instead and reads it
back as a Decimal, so history is exact there too. Equality filters work on both backends
(values are always written with the same number of decimal places); do order-sensitive
arithmetic (min/max, ranges) in Python or on PostgreSQL.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper


class ExactDecimalField(models.DecimalField):
    def get_internal_type(self) -> str:
        # A distinct internal type keeps SQLite's float-based decimal converter away.
        return "ExactDecimalField"

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        if connection.vendor == "sqlite":
            return "text"
        return connection.data_types["DecimalField"] % self.db_type_parameters(connection)

    def from_db_value(self, value: Any, expression: Any, connection: BaseDatabaseWrapper) -> Any:
        if value is None or isinstance(value, Decimal):
            return value
        return Decimal(str(value))
