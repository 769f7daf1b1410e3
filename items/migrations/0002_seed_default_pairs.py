"""The eight default pairs: BTC, ETH, USDTTRC, USDTERC against RUB and USD (docs/api.md#items)."""

from __future__ import annotations

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

BASES = ("BTC", "ETH", "USDTTRC", "USDTERC")
QUOTES = ("RUB", "USD")
NAMES = {
    "BTC": "Bitcoin",
    "ETH": "Ether",
    "USDTTRC": "Tether USDT (TRC20, TRON)",
    "USDTERC": "Tether USDT (ERC20, Ethereum)",
}


def seed(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Item = apps.get_model("items", "Item")
    for base in BASES:
        for quote in QUOTES:
            # get_or_create: re-running or a pre-existing pair is never an error.
            Item.objects.get_or_create(
                code=f"{base}-{quote}",
                defaults={"base": base, "quote": quote, "name": f"{NAMES[base]} / {quote}"},
            )


def unseed(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    Item = apps.get_model("items", "Item")
    Item.objects.filter(code__in=[f"{b}-{q}" for b in BASES for q in QUOTES]).delete()


class Migration(migrations.Migration):
    dependencies = [("items", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
