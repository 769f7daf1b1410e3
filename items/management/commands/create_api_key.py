"""`manage.py create_api_key NAME`: create a key; the raw key is printed once, alone, last."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from items.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for the write endpoints and print the raw key once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="who or what the key is for")

    def handle(self, *args: Any, name: str, **options: Any) -> None:
        try:
            api_key, raw_key = api_key_create(name=name)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"Created API key {api_key.name!r} ({api_key.prefix}…). Store it now:")
        self.stdout.write(raw_key)
