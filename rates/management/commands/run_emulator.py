"""``python manage.py run_emulator``: the local exchange emulator (rates/emulator/README.md)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from rates.emulator import PROVIDERS, Fault, parse_depeg, parse_fault_flag, run_emulator_server
from rates.emulator.market import SYNTHETIC_LIMIT, SYNTHETIC_PREFIX, WALK_SLICES

logger = logging.getLogger("rates.emulator")


class Command(BaseCommand):
    help = (
        "Serve every built-in provider's real REST and WebSocket API on one port, with random-walk "
        "prices and fault switches (see rates/emulator/README.md)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8900)
        parser.add_argument(
            "--tick", type=float, default=1.0, help="seconds between price moves (default 1)"
        )
        parser.add_argument("--seed", type=int, default=None, help="seed of the random walk")
        parser.add_argument(
            "--fault",
            action="append",
            default=[],
            metavar="PROVIDER=MODE[:key=value...]",
            help="start with a fault, e.g. binance=down, bybit=slow:delay=2, all=drop_stream "
            "(repeatable)",
        )
        parser.add_argument(
            "--depeg",
            default=None,
            metavar="PRICE",
            help="start with USDT trading at PRICE USD on every exchange and on CoinGecko",
        )
        parser.add_argument(
            "--synthetic-pairs",
            type=int,
            default=0,
            metavar="N",
            help="also list N made-up coins SYN0001..SYNnnnn (USDT books on Binance and Bybit, "
            "usd on CoinGecko), each walking with the rest (a scale benchmark's load)",
        )
        parser.add_argument(
            "--walk-slices",
            type=int,
            default=WALK_SLICES,
            metavar="K",
            help=f"spread each tick's moves over K slices of the tick (default {WALK_SLICES}, as "
            "an exchange spreads its updates); 1 moves every price at the same instant",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not 0 <= options["port"] <= 65535:
            raise CommandError(f"--port: expected 0-65535, got {options['port']}")
        if not options["tick"] > 0:
            raise CommandError(f"--tick: expected seconds > 0, got {options['tick']}")
        synthetic = options["synthetic_pairs"]
        if options["walk_slices"] < 1:
            raise CommandError(f"--walk-slices: expected 1 or more, got {options['walk_slices']}")
        if not 0 <= synthetic <= SYNTHETIC_LIMIT:
            raise CommandError(
                f"--synthetic-pairs: expected 0 to {SYNTHETIC_LIMIT}, got {synthetic}"
            )
        faults: dict[str, Fault] = {}
        for flag in options["fault"]:
            try:
                provider, fault = parse_fault_flag(flag)
            except ValueError as exc:
                raise CommandError(f"--fault: {exc}") from None
            faults.update(
                dict.fromkeys(PROVIDERS, fault) if provider == "all" else {provider: fault}
            )
        depeg = None
        if options["depeg"] is not None:
            try:
                depeg = parse_depeg(options["depeg"])
            except ValueError as exc:
                raise CommandError(f"--depeg: {exc}") from None
        try:
            asyncio.run(
                self.serve(
                    options["host"],
                    options["port"],
                    options["tick"],
                    options["seed"],
                    faults,
                    depeg,
                    synthetic,
                    options["walk_slices"],
                )
            )
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']}: {exc}"
            ) from None

    async def serve(
        self,
        host: str,
        port: int,
        tick: float,
        seed: int | None,
        faults: dict[str, Fault],
        depeg: Decimal | None,
        synthetic_pairs: int,
        slices: int = WALK_SLICES,
    ) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        started = time.monotonic()
        async with run_emulator_server(
            host=host,
            port=port,
            tick=tick,
            seed=seed,
            faults=faults,
            depeg=depeg,
            synthetic_pairs=synthetic_pairs,
            slices=slices,
        ) as emulator:
            self.stdout.write(f"Exchange emulator on {emulator.base_url}")
            for provider in PROVIDERS:
                ws = f"  KURS_{provider.upper()}_WS_URL={emulator.ws_url(provider)}"
                has_ws = provider in ("binance", "bybit")
                self.stdout.write(
                    f"  KURS_{provider.upper()}_REST_URL={emulator.rest_url(provider)}"
                    + (ws if has_ws else "")
                )
            self.stdout.write(f"  control: {emulator.base_url}/_control   (Ctrl-C to stop)")
            for provider, fault in faults.items():
                self.stdout.write(f"  {provider}: {fault.mode}")
            if depeg is not None:
                self.stdout.write(f"  depeg: USDT trades at {depeg} USD")
            if synthetic_pairs:
                last = f"{SYNTHETIC_PREFIX}{synthetic_pairs:04d}"
                self.stdout.write(f"  synthetic pairs: {SYNTHETIC_PREFIX}0001..{last}")
            await stop.wait()
            app = emulator.app
        logger.info(
            "emulator stopped after %.0fs: %d REST requests, %d stream connections served",
            time.monotonic() - started,
            app.served_requests,
            app.served_streams,
        )
