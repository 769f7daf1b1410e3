"""`python manage.py run_fetch [--watch] [--provider NAME] [--json]`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from config.jsonenc import dumps
from config.metrics_port import serve_metrics_port
from rates.fetch_control import fetch_once, fetch_read_only
from rates.fetcher import MAX_ROUND_SECONDS, CycleReport, Fetcher, http_client
from rates.providers import PROVIDER_CLASSES, build_providers

logger = logging.getLogger("rates.run_fetch")


class Command(BaseCommand):
    help = (
        "Fetch rates from the providers once and print them (exit 1 if no provider returned a "
        "valid quote), or with --watch keep streaming and polling until stopped."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--watch",
            action="store_true",
            help="run until SIGINT/SIGTERM: WebSocket streams plus REST every KURS_POLL_INTERVAL",
        )
        parser.add_argument("--provider", metavar="NAME", help="use only this provider")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args: Any, **options: Any) -> None:
        names = list(settings.KURS_PROVIDERS)
        if options["provider"]:
            name = options["provider"].strip().lower()
            if name not in PROVIDER_CLASSES:
                known = ", ".join(PROVIDER_CLASSES)
                raise CommandError(f"--provider: unknown provider {name!r} (known: {known})")
            names = [name]
        as_json = options["json"]
        if options["watch"]:
            serve_metrics_port("run_fetch --watch")
            asyncio.run(self._watch(names, as_json=as_json))
            return
        report = asyncio.run(self._once(names))
        self.stdout.write(_render_json(report) if as_json else _render_table(report))
        if not report.ok:
            sys.exit(1)

    @staticmethod
    async def _once(names: list[str]) -> CycleReport:
        # The safety net's cycle; while a live fetcher owns rates, quote without writing.
        report = await fetch_once(provider_names=names)
        if report is not None:
            return report
        logger.warning("a live fetcher owns rates: this cycle only quotes, it stores nothing")
        return await fetch_read_only(provider_names=names)

    async def _watch(self, names: list[str], *, as_json: bool) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        started = time.monotonic()
        poll = settings.KURS_POLL_INTERVAL
        logger.info("fetching from %s every %gs (streams where offered)", ", ".join(names), poll)

        def on_cycle(report: CycleReport) -> None:
            if as_json:
                self.stdout.write(_render_json(report))
            else:
                logger.info(
                    "cycle: %d stored in %d ms; %s",
                    report.stored,
                    report.duration_ms,
                    ", ".join(f"{name} {status}" for name, status in report.providers.items()),
                )

        async with http_client(min(MAX_ROUND_SECONDS, poll)) as client:
            fetcher = Fetcher(build_providers(names, client=client), on_cycle=on_cycle)
            await fetcher.watch(stop)
        logger.info(
            "run_fetch stopped after %.0fs: %d cycles, %d rates stored",
            time.monotonic() - started,
            fetcher.cycles,
            fetcher.stored,
        )


def _plain(value: Decimal | None) -> str:
    return "-" if value is None else format(value.normalize(), "f")


def _render_table(report: CycleReport) -> str:
    header = ("pair", "value", "provider", "age")
    rows = [
        (
            row["pair"],
            _plain(row["value"]),
            (row["provider"] or "-") + (" (derived)" if row["derived"] else ""),
            "-" if row["age_s"] is None else f"{row['age_s']:.1f}s",
        )
        for row in report.rows
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in [header, *rows]
    ]
    lines.append("")
    for name, status in report.providers.items():
        lines.append(f"{name}: {status}")
    lines.append(f"stored {report.stored} rates in {report.duration_ms} ms")
    return "\n".join(line.rstrip() for line in lines)


def _render_json(report: CycleReport) -> str:
    return dumps({**report.event(), "ok": report.ok, "rates": report.rows})
