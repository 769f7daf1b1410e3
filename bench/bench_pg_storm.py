"""Reads during a PostgreSQL storm: how many answers are 200, a clean 503, or another 5xx.

    .venv/bin/python bench/bench_pg_storm.py [--seconds 10] [--clients 4] [--rounds 3]
        [--database-url postgres://postgres@127.0.0.1:5432/kurs_pg_storm]

A fetcher (`run_fetch --watch`, polling every second) and a uvicorn web process run against the
exchange emulator, a PostgreSQL database of their own (created anew, dropped at the end) and the
machine's NATS (127.0.0.1:4222). Each round terminates every connection to that database ten
times a second for `--seconds` while `--clients` clients read candles, history, latest, the
items, an item, the providers, health and the dashboard (`tests/pgstorm.py`) as fast as the web
answers. A read whose connection ended is read again once on a new connection, else answered
503 JSON with Retry-After; the target is 0 other 5xx (issue 17 counted 90 x 500 before the
edge retried). `tests/test_faults.py` asserts the same on one 10 s round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from rates.emulator import run_emulator_server  # noqa: E402
from tests.pgstorm import storm, storm_reads  # noqa: E402
from tests.services import POSTGRES_URL  # noqa: E402
from tests.stack import Stack, wait_until  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default=f"{POSTGRES_URL.rsplit('/', 1)[0]}/kurs_pg_storm")
    options = parser.parse_args()
    print(f"cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f} at start")
    async with run_emulator_server(host="127.0.0.1", port=0, tick=0.5, seed=7) as emulator:
        stack = Stack(
            folder=Path(tempfile.mkdtemp(prefix="kurs-bench-pg-storm-")),
            emulator=emulator,
            poll=1.0,
            database_url=options.database_url,
        )
        stack.migrate(active=("BTC-USD", "ETH-USD"))
        stack.fetcher()
        web = stack.web()
        base = f"http://127.0.0.1:{web.port}"
        try:
            await wait_until(
                lambda: len(stack.query("SELECT 1 FROM rates_currentrate")) == 2,
                within=60,
                what="current rates for every pair",
            )
            paths = storm_reads(stack.item_id("BTC-USD"))
            totals = {"reads": 0, "200": 0, "clean 503": 0, "other 5xx": 0}
            for _ in range(options.rounds):
                result = await storm(
                    stack, base, paths, seconds=options.seconds, clients=options.clients
                )
                print(result.summary())
                for path, status, body in result.failed[:5]:
                    print(f"  {status} {path}: {body!r}")
                totals["reads"] += len(result.seen)
                totals["200"] += result.counts[200]
                totals["clean 503"] += result.refused
                totals["other 5xx"] += len(result.failed)
            print(f"\n{options.rounds} rounds: {totals}")
        finally:
            stack.stop()
            stack.drop_database()
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    asyncio.run(main())
