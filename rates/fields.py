"""An exact, comparable decimal column on every backend.

PostgreSQL's NUMERIC is exact. SQLite has no decimal type: Django's DecimalField lands in a
NUMERIC-affinity column that SQLite converts to a 15-digit REAL, so 54001.123456789012345678
would come back rounded. On SQLite this field stores text instead: the value quantised to the
field's decimal places and zero-padded to a fixed width (`00000000000000054001.123456789012345678`),
so it reads back exactly, equal values have equal text, and for the non-negative numbers it holds
(prices) text order is numeric order: `value__gt`, `order_by("value")`, Min and Max work as on
PostgreSQL. Sums and averages are computed by SQLite in floating point; do those in Python.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper


# Unparametrised: django-stubs' plugin types each column, nullable or not, from DecimalField's own
# declarations, and Django's fields take no subscript at run time.
class ExactDecimalField(models.DecimalField):  # type: ignore[type-arg]  # generic only in stubs
    def get_internal_type(self) -> str:
        # A distinct internal type keeps SQLite's float-based decimal converter away.
        return "ExactDecimalField"

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        if connection.vendor == "sqlite":
            return "text"
        return connection.data_types["DecimalField"] % self.db_type_parameters(connection)

    def get_db_prep_value(
        self, value: Any, connection: BaseDatabaseWrapper, prepared: bool = False
    ) -> Any:
        if connection.vendor != "sqlite":
            return super().get_db_prep_value(value, connection, prepared)
        if not prepared:
            value = self.get_prep_value(value)
        if value is None or hasattr(value, "as_sql"):
            return value
        return self.sortable_text(Decimal(value))

    def sortable_text(self, value: Decimal) -> str:
        quantum = Decimal(1).scaleb(-self.decimal_places)
        # copy_abs, not abs(): abs() rounds to the thread context's 28 digits, a value has 38.
        # Django's DecimalField.context (precision max_digits), which django-stubs does not declare.
        context = self.context  # type: ignore[attr-defined]  # missing from django-stubs
        text = format(value.quantize(quantum, context=context).copy_abs(), "f")
        width = self.max_digits + 1  # the digits and the point
        return ("-" if value < 0 else "") + text.rjust(width, "0")

    def from_db_value(self, value: Any, expression: Any, connection: BaseDatabaseWrapper) -> Any:
        if value is None or isinstance(value, Decimal):
            return value
        return Decimal(str(value))
