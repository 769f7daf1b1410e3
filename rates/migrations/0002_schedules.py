"""The django-q2 schedules of docs/rates.md#fetching, made idempotently (update_or_create by name).

`catch_up` is off cluster-wide (Q_CLUSTER): after downtime, one run, not a burst of missed ones.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps
from django.utils import timezone

SCHEDULES: dict[str, dict[str, Any]] = {
    "rates.fetch_rates": {"func": "rates.tasks.fetch_rates", "schedule_type": "I", "minutes": 1},
    "rates.prune_history": {"func": "rates.tasks.prune_history", "schedule_type": "D"},
}


def create_schedules(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Schedule = apps.get_model("django_q", "Schedule")
    for name, fields in SCHEDULES.items():
        Schedule.objects.update_or_create(
            name=name,
            defaults={"minutes": None, "repeats": -1, **fields},
            create_defaults={"minutes": None, "repeats": -1, "next_run": timezone.now(), **fields},
        )


def delete_schedules(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.filter(name__in=SCHEDULES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("rates", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create_schedules, delete_schedules)]
