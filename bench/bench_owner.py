"""The owner's CPU per accepted quote, in process: N synthetic pairs through `accept_quotes`.

    .venv/bin/python bench/bench_owner.py [--pairs 1000] [--ticks 20] [--repeats 3]
        [--database-url postgres://postgres@127.0.0.1:5432/kurs_quote20]   # else a temporary SQLite
        [--profile 25 [--sort cumulative]]   # cProfile the timed ticks: the top N functions

Kurs tracks `SYNnnnn-USDT` (as bench_scale.py); every tick, Binance and Bybit each quote every
pair with a new price, one burst each (`services.accept_quotes`, as the owner's stream consumers
hand them over), then the owner's after-cycle step measures the pegs (`PegMonitor.evaluate`,
KURS_PEGS default USDT:USD). CPU is `time.process_time` (this process only: the database's own
work on PostgreSQL is not in it). Printed per accepted quote, in µs, medians over --repeats:

- board: the floor, the same quotes through the board alone (`QuoteBoard.accept` + `state`,
  no decide, no rows): the in-run baseline every other figure is a ratio of;
- accept: `accept_quotes` (validate, decide, the burst's rows in one transaction, the outbox);
- pegs: `PegMonitor.evaluate` once per tick, spread over that tick's quotes;
- owner: accept + pegs;
- restart: accept for a new owner's first burst (the board remembers no history row: each
  pair's last one is read from the database), once per run;
- server (PostgreSQL on this host only): the CPU of the bench's server process (its backend,
  read from /proc) during accept, per accepted quote: the database's share of the owner's
  cost, on the same cores when it runs beside the owner.

The machine's cores are shared: quote medians and the ratios, not single figures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

PROVIDERS = ("binance", "bybit")


def setup(args: argparse.Namespace, workdir: Path) -> None:
    os.environ["DATABASE_URL"] = args.database_url or f"sqlite:///{workdir / 'owner.sqlite3'}"
    os.environ.setdefault("KURS_PROVIDERS", ",".join(PROVIDERS))
    # No NATS server there: events are queued as the owner queues them, not sent to a shared one.
    os.environ.setdefault("NATS_URL", "nats://127.0.0.1:28999")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-owner-not-secret")  # DEBUG off: no query log
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)


def reset(pairs: int) -> list[str]:
    """Empty the rate tables, track exactly the bench's pairs; a fresh board."""
    from items.models import Item
    from rates import services
    from rates.board import QuoteBoard
    from rates.models import CurrentRate, Rate, ServedRate
    from realtime.models import OutboxEvent

    for model in (OutboxEvent, ServedRate, CurrentRate, Rate):
        model.objects.all().delete()
    Item.objects.update(is_active=False)
    codes = [f"SYN{n:04d}-USDT" for n in range(1, pairs + 1)]
    existing = set(Item.objects.filter(base__startswith="SYN").values_list("base", flat=True))
    Item.objects.bulk_create(
        [
            Item(base=base, quote="USDT", code=Item.make_code(base, "USDT"))
            for base in (code.split("-")[0] for code in codes)
            if base not in existing
        ]
    )
    Item.objects.filter(base__startswith="SYN", quote="USDT").update(is_active=True)
    services._board = QuoteBoard()
    services.get_board().forget_items()
    return codes


def quotes(codes: list[str], provider: str, tick: int) -> list[Any]:
    from django.utils import timezone

    from rates.providers.base import Quote

    now = timezone.now()
    # A new price each tick, different per provider (within the consensus tolerance).
    step = Decimal(tick % 50) / 1000 + (Decimal("0.0002") if provider == "bybit" else 0)
    return [
        Quote(provider=provider, pair=code, value=Decimal(10 + n) + step, source_time=now)
        for n, code in enumerate(codes)
    ]


def server_cpu() -> float | None:
    """CPU seconds the connection's PostgreSQL backend has used (None: not PostgreSQL, or not a
    process of this host)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime, fields 14 and 15 of the file (11 and 12 after the command's ")").
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(args: argparse.Namespace, profile: cProfile.Profile | None) -> dict[str, float]:
    from django.utils import timezone

    from rates import peg_monitor, services
    from rates.board import QuoteBoard

    codes = reset(args.pairs)
    spent = {"board": 0.0, "accept": 0.0, "pegs": 0.0, "server": 0.0}
    accepted, restart = 0, 0.0
    floor = QuoteBoard()
    for tick in range(args.ticks + 2):
        bursts = [quotes(codes, provider, tick) for provider in PROVIDERS]
        # Tick 0: every pair's first rate (inserts, not the steady state). Tick 1: as a new
        # owner's first burst, the board remembering no history row (the `restart` figure).
        timed = tick > 1
        if tick == 1:
            services.get_board().last_stored.clear()
            start = time.process_time()
            restarted = sum(r.accepted for b in bursts for r in services.accept_quotes(b))
            restart = (time.process_time() - start) / restarted * 1e6
            continue
        start = time.process_time()
        for burst in bursts:
            now = timezone.now()
            for quote in burst:
                entry = services._validate(quote, cross=None, now=now, board=floor)
                floor.accept(quote.pair, entry)
                floor.state(quote.pair, now=now)
        board_cpu = time.process_time() - start
        if profile is not None and timed:
            profile.enable()
        server_start = server_cpu()
        start = time.process_time()
        for burst in bursts:
            results = services.accept_quotes(burst)
            accepted += sum(r.accepted for r in results) if timed else 0
        accept_cpu = time.process_time() - start
        server_end = server_cpu()
        if server_start is not None and server_end is not None:
            spent["server"] += (server_end - server_start) if timed else 0.0
        start = time.process_time()
        peg_monitor.get_monitor().evaluate(services.get_board(), now=timezone.now())
        pegs_cpu = time.process_time() - start
        if profile is not None and timed:
            profile.disable()
        if timed:
            spent["board"] += board_cpu
            spent["accept"] += accept_cpu
            spent["pegs"] += pegs_cpu
    per = {name: seconds / accepted * 1e6 for name, seconds in spent.items()}
    per["restart"] = restart
    per["owner"] = per["accept"] + per["pegs"]
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--sort", default="tottime", help="the profile's order (pstats key)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        setup(args, Path(workdir))
        profile = cProfile.Profile() if args.profile else None
        runs = [one_run(args, profile) for _ in range(args.repeats)]
    engine = "postgresql" if args.database_url else "sqlite"
    print(f"{engine}, {args.pairs} pairs x {len(PROVIDERS)} providers, {args.ticks} ticks")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    base = statistics.median(run["board"] for run in runs)
    names = ["board", "accept", "pegs", "owner", "restart"]
    if args.database_url:
        names.append("server")
    for name in names:
        value = statistics.median(run[name] for run in runs)
        print(f"{name:>7}: {value:8.1f} us/quote  x{value / base:6.1f} of board")
    if profile is not None:
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.profile)


if __name__ == "__main__":
    main()
