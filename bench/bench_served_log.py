"""Point-in-time lookups at 10 million served-log rows on PostgreSQL, and the log's storage.

    .venv/bin/python bench/bench_served_log.py [--rows 10000000] [--items 100]
        [--lookups 2000] [--repeats 3]
        [--database-url postgres://postgres@127.0.0.1:5432/kurs_bench_served_log]

The database (created when missing, kept between runs: filling it is the slow part) is migrated,
then filled with `--rows` versions spread over `--items` pairs, one version every
KURS_POLL_INTERVAL per pair, by one `INSERT ... SELECT generate_series` (not the ORM). Then, in
each of `--repeats` rounds, `--lookups` random (pair, instant) lookups through
`rates.servedlog.version_at` (what `?at=` reads: the last version at or before the instant, and
the next one), beside the same number of primary-key reads of one row through the ORM (the
baseline: the cheapest read the ORM makes) and the lookup's SQL alone through a cursor (the
database's share). Figures are medians of the rounds; the target is p99
< 20 ms. Storage: `pg_total_relation_size` (table, TOAST and indexes) per row, times the versions
a pair logs per day at the default cadence. And the whole request, in-process through the
app: `GET .../rates/latest?at=` beside the same route without `at` (`--lookups / 4` each). The
machine is shared (2 cores, other sessions' tests): the ratio to the baseline is the figure to
compare between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_URL = os.environ.get(
    "KURS_BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/kurs_bench_served_log"
)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    return parser.parse_args()


def ensure_database(url: str) -> None:
    """Create the database named in `url` when it does not exist (on the server's `postgres`)."""
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if found.fetchone() is None:
            connection.execute(f'CREATE DATABASE "{name}"')


OPTIONS = parse()
ensure_database(OPTIONS.database_url)
os.environ["DATABASE_URL"] = OPTIONS.database_url
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("KURS_LOG_LEVEL", "ERROR")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from items.models import Item  # noqa: E402
from rates import servedlog  # noqa: E402
from rates.models import CurrentRate, ServedRate  # noqa: E402

FILL = """
INSERT INTO rates_servedrate (item_id, served_at, provider, value, bid, ask, source_time,
    checked_at, received_at, derived, route, status, version)
SELECT (%(ids)s::bigint[])[n %% %(items)s + 1], at, 'binance', v, v - 0.5, v + 0.5, at, at, at,
    false, '[]', 'live', n / %(items)s + 1
FROM generate_series(0, %(rows)s - 1) AS n,
LATERAL (SELECT %(start)s::timestamptz + (n / %(items)s) * %(step)s * interval '1 second' AS at,
                54000 + (n %% 997) / 100.0 AS v) AS moment
"""


def fill(rows: int, items: int) -> tuple[list[int], list[tuple[int, datetime, datetime]]]:
    """The bench's items, and (item, first, last served_at) of each, filling the log if needed."""
    codes = [f"SL{i:04d}-USD" for i in range(items)]
    for code in codes:
        base, quote = code.split("-")
        Item.objects.get_or_create(base=base, quote=quote)
    ids = list(Item.objects.filter(code__in=codes).order_by("id").values_list("id", flat=True))
    have = ServedRate.objects.filter(item_id__in=ids).count()
    if have != rows:
        print(f"filling the served log: {rows:,} rows over {items} pairs (had {have:,})")
        started = time.perf_counter()
        step = float(settings.KURS_POLL_INTERVAL)
        span = timedelta(seconds=step * (rows // items + 1))
        start = timezone.now() - span - timedelta(minutes=1)
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE rates_servedrate")
            params: dict[str, Any] = {
                "ids": ids,
                "rows": rows,
                "items": items,
                "start": start,
                "step": step,
            }
            cursor.execute(FILL, params)
            cursor.execute("VACUUM ANALYZE rates_servedrate")
        print(f"  filled in {time.perf_counter() - started:.0f} s")
    bounds = []
    for item_id in ids:
        versions = ServedRate.objects.filter(item_id=item_id).values_list("served_at", flat=True)
        first, last = (
            versions.order_by("served_at").first(),
            versions.order_by("-served_at").first(),
        )
        if first is None or last is None:
            raise SystemExit(f"item {item_id} has no versions: drop the database and run again")
        bounds.append((item_id, first, last))
    return ids, bounds


# What `version_at` asks, as plain SQL through a cursor: the database's share of a lookup.
AT_SQL = """
SELECT s.*, (SELECT u.served_at FROM rates_servedrate u
             WHERE u.item_id = s.item_id AND u.served_at > s.served_at
             ORDER BY u.served_at LIMIT 1)
FROM rates_servedrate s WHERE s.item_id = %s AND s.served_at <= %s
ORDER BY s.served_at DESC, s.id DESC LIMIT 1
"""


def sql_at(item_id: int, at: datetime) -> object:
    with connection.cursor() as cursor:
        cursor.execute(AT_SQL, [item_id, at])
        return cursor.fetchone()


def pk_read(key: int) -> ServedRate | None:
    """The baseline: one row by primary key through the ORM."""
    return ServedRate.objects.filter(pk=key).first()


def current_rates(bounds: list[tuple[int, datetime, datetime]]) -> None:
    """A current rate for each pair: `latest` without `at` reads it."""
    for item_id, first, _ in bounds:
        CurrentRate.objects.get_or_create(
            item_id=item_id,
            defaults={
                "provider": "binance",
                "value": 54000,
                "source_time": first,
                "checked_at": first,
                "received_at": first,
                "status": "live",
                "version": 1,
            },
        )


async def http_rounds(
    bounds: list[tuple[int, datetime, datetime]], now: datetime, rng: random.Random
) -> dict[str, list[tuple[float, float]]]:
    """`GET .../rates/latest?at=` through the whole app in-process (the edge, then the ninja
    route: `?at=` is not the route table's), beside the same route without `at` (one read of
    the current rate), each `--lookups` times a round."""
    from edge.tests.asgi import call

    found: dict[str, list[tuple[float, float]]] = {"http_at": [], "http_now": []}
    for _ in range(OPTIONS.repeats):
        for name in found:
            ms = []
            for _ in range(OPTIONS.lookups // 4):
                item_id, first, last = rng.choice(bounds)
                query = b""
                if name == "http_at":
                    at = first + timedelta(seconds=rng.uniform(0, (last - first).total_seconds()))
                    query = b"at=" + at.isoformat().replace("+00:00", "Z").encode()
                started = time.perf_counter()
                answer = await call(f"/api/v1/items/{item_id}/rates/latest", query)
                ms.append((time.perf_counter() - started) * 1000)
                if answer.status != 200:
                    raise SystemExit(f"{name}: {answer.status} {answer.body[:200]!r}")
            found[name].append((percentile(ms, 0.5), percentile(ms, 0.99)))
    return found


def timed(calls: list[Callable[[], object]]) -> list[float]:
    """Milliseconds per call."""
    out = []
    for call in calls:
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    print(f"cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f} at start")
    call_command("migrate", verbosity=0)
    ids, bounds = fill(OPTIONS.rows, OPTIONS.items)
    rows = ServedRate.objects.count()
    low, high = (
        ServedRate.objects.order_by("id").first(),
        ServedRate.objects.order_by("-id").first(),
    )
    if low is None or high is None:
        raise SystemExit("the served log is empty")
    rng = random.Random(7)
    now = timezone.now()
    rounds: dict[str, list[tuple[float, float]]] = {"at": [], "sql": [], "pk": []}
    for _ in range(OPTIONS.repeats):
        lookups: list[Callable[[], object]] = []
        plain: list[Callable[[], object]] = []
        for _ in range(OPTIONS.lookups):
            item_id, first, last = rng.choice(bounds)
            at = first + timedelta(seconds=rng.uniform(0, (last - first).total_seconds()))
            lookups.append(partial(servedlog.version_at, at, item_id=item_id, now=now))
            plain.append(partial(sql_at, item_id, at))
        keys = [rng.randint(low.id, high.id) for _ in range(OPTIONS.lookups)]
        baseline: list[Callable[[], object]] = [partial(pk_read, key) for key in keys]
        for name, calls in (("at", lookups), ("sql", plain), ("pk", baseline)):
            ms = timed(calls)
            rounds[name].append((percentile(ms, 0.5), percentile(ms, 0.99)))
    current_rates(bounds)
    http = asyncio.run(http_rounds(bounds, now, rng))
    rounds.update(http)
    p50 = {name: statistics.median(r[0] for r in results) for name, results in rounds.items()}
    p99 = {name: statistics.median(r[1] for r in results) for name, results in rounds.items()}
    print(f"\nrows {rows:,} over {len(ids)} pairs; {OPTIONS.lookups} lookups x {OPTIONS.repeats}")
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'point in time (version_at)':28}{p50['at']:>10.3f}{p99['at']:>10.3f}")
    print(f"{'  the same as plain SQL':28}{p50['sql']:>10.3f}{p99['sql']:>10.3f}")
    print(f"{'baseline: ORM pk read':28}{p50['pk']:>10.3f}{p99['pk']:>10.3f}")
    print(f"{'ratio':28}{p50['at'] / p50['pk']:>10.2f}{p99['at'] / p99['pk']:>10.2f}")
    print(f"{'HTTP latest?at= (in-process)':28}{p50['http_at']:>10.3f}{p99['http_at']:>10.3f}")
    print(f"{'baseline: HTTP latest (now)':28}{p50['http_now']:>10.3f}{p99['http_now']:>10.3f}")
    ratio_p50, ratio_p99 = p50["http_at"] / p50["http_now"], p99["http_at"] / p99["http_now"]
    print(f"{'ratio':28}{ratio_p50:>10.2f}{ratio_p99:>10.2f}")
    verdict = "met" if p99["at"] < 20 else "NOT met"
    print(f"target p99 < 20 ms: {verdict}")

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size('rates_servedrate')")
        total = cursor.fetchone()[0]
        cursor.execute("SELECT pg_relation_size('rates_servedrate')")
        heap = cursor.fetchone()[0]
    per_row = total / rows
    per_poll = 86400 / float(settings.KURS_POLL_INTERVAL)
    per_heartbeat = 86400 / (float(settings.KURS_STALE_AFTER) / 2)
    print(
        f"\nstorage: {total / 2**20:,.0f} MiB in all ({heap / 2**20:,.0f} MiB table),"
        f" {per_row:.0f} bytes per version with its indexes"
    )
    print(
        f"per pair per day: {per_poll:,.0f} versions (a change every poll) ="
        f" {per_row * per_poll / 2**20:.2f} MiB; {per_heartbeat:,.0f} (heartbeats only) ="
        f" {per_row * per_heartbeat / 2**20:.2f} MiB"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
