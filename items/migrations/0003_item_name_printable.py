"""Item names without control characters: the validator, and existing rows cleaned.

Before the validator, the admin and the API let C0/C1 control characters into a name (a NUL only
on SQLite: PostgreSQL refuses it). They are replaced by a space, runs of blanks squeezed.
"""

from __future__ import annotations

import re

from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

import items.models

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_names(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    # Items are tracked pairs, a few dozen rows: read them all rather than trust each database's
    # regex dialect with control characters.
    Item = apps.get_model("items", "Item")
    for item in Item.objects.only("id", "name").iterator():
        if CONTROL.search(item.name):
            item.name = " ".join(CONTROL.sub(" ", item.name).split())
            item.save(update_fields=["name"])


class Migration(migrations.Migration):
    dependencies = [
        ("items", "0002_seed_default_pairs"),
    ]

    operations = [
        migrations.AlterField(
            model_name="item",
            name="name",
            field=models.CharField(
                blank=True,
                default="",
                max_length=100,
                validators=[items.models.validate_printable],
            ),
        ),
        migrations.RunPython(clean_names, migrations.RunPython.noop),
    ]
