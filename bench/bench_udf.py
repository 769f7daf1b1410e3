"""UDF `history` (docs/api.md#tradingview-udf) for a day of 1-minute bars, beside the candles
endpoint in the same run.

    .venv/bin/python bench/bench_udf.py [--duration 4] [--repeats 3]

BTC-USD has a day of binance rates, one a second (86,400 rows, as in the candles measurement of
`rates.selectors.candle_list`), in SQLite on a temporary file; Kurs runs as `bench_courses.py`
runs it (uvicorn with Kurs's HTTP protocol, production settings, one worker, its own
nats-server). One client asks back to back, in turns:

1. `udf/history?resolution=1` over the day: 1,440 bars, the figure asked for;
2. `udf/history?resolution=1` over the last 1,000 minutes, against
3. `items/1/candles?interval=1m` over the same 1,000 minutes (the candles endpoint's maximum),
   the baseline: the same read, in the candles' shape;
4. `udf/history?resolution=15` over the day (96 bars aggregated from 288 5-minute candles).

Medians of --repeats runs; the machine's other sessions share its two cores (printed).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_courses import (
    PYTHON,
    REPO,
    get,
    kurs_cmd,
    running,
    server_env,
)
from wrk import bench_run

from tests.services import free_port

DAY = 86400
# The day ends at a whole minute an hour ago: the bench's reads do not depend on when it runs.
END = (int(time.time()) // 60 - 60) * 60
START = END - DAY

SEED = textwrap.dedent(
    f"""
    from datetime import UTC, datetime
    from decimal import Decimal
    from items.models import Item
    from rates.models import Rate
    item = Item.objects.get(code="BTC-USD")
    rows = [
        Rate(item=item, provider="binance", value=Decimal(54000 + (n * 7919) % 1000) / 10,
             source_time=datetime.fromtimestamp({START} + n, tz=UTC),
             received_at=datetime.fromtimestamp({START} + n, tz=UTC))
        for n in range({DAY})
    ]
    Rate.objects.bulk_create(rows, batch_size=5000)
    print("item", item.id)
    """
)


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")


def rate(url: str, duration: float) -> tuple[float, float]:
    """One client asking back to back for `duration` s (at least 3 answers): (req/s, p99 ms).

    Not wrk: an answer takes about a second on this shared machine, past wrk's 2 s timeout
    once a few connections queue on one worker.
    """
    took: list[float] = []
    started = time.perf_counter()
    while len(took) < 3 or time.perf_counter() - started < duration:
        at = time.perf_counter()
        status, _, _ = get(url)
        took.append(time.perf_counter() - at)
        if status != 200:
            raise SystemExit(f"bench: {status} from {url}")
    took.sort()
    return len(took) / sum(took), took[min(len(took) - 1, int(len(took) * 0.99))] * 1000


def measure(targets: dict[str, str], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Median req/s and p99 of each target, in turns (A B C, A B C...), so that the other
    sessions' load falls evenly on a figure and its baseline."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    for _ in range(args.repeats):
        for name, url in targets.items():
            runs[name].append(rate(url, args.duration))
    return {
        name: (statistics.median(r for r, _ in got), statistics.median(p for _, p in got))
        for name, got in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    thousand = END - 1000 * 60
    paths = {
        "udf history 1, a day (1,440 bars)": (
            f"/api/v1/udf/history?symbol=BTC-USD&resolution=1&from={START}&to={END}"
        ),
        "udf history 1, 1,000 bars": (
            f"/api/v1/udf/history?symbol=BTC-USD&resolution=1&from={thousand}&to={END}"
        ),
        "candles 1m, 1,000 candles": (
            f"/api/v1/items/{{id}}/candles?interval=1m&since={iso(thousand)}&until={iso(END)}"
        ),
        "udf history 15, a day (96 bars)": (
            f"/api/v1/udf/history?symbol=BTC-USD&resolution=15&from={START}&to={END}"
        ),
    }
    with bench_run("kurs-bench-udf-") as (tmp, nats_port):
        env = server_env(tmp, nats_port, "WARNING")
        (tmp / "item.json").write_bytes(b"{}")
        migrate = ["manage.py", "migrate", "--no-input", "-v", "0"]
        subprocess.run([PYTHON, *migrate], cwd=REPO, env=env, check=True, timeout=300)
        seeded = subprocess.run(
            [PYTHON, "manage.py", "shell", "-c", SEED],
            cwd=REPO, env=env, check=True, timeout=300, capture_output=True, text=True,
        )  # fmt: skip
        item_id = seeded.stdout.split()[-1]
        paths = {label: path.replace("{id}", item_id) for label, path in paths.items()}
        port = free_port()
        app = "config.asgi:application"
        with running(kurs_cmd(app, port, 1), env, port, "/api/v1/udf/config") as origin:
            for label, path in paths.items():
                status, _, body = get(origin + path)
                assert status == 200, (label, body[:300])
                took = time.perf_counter()
                get(origin + path)
                took = time.perf_counter() - took
                print(f"{label}: {len(body):,} bytes, one request alone {took * 1000:.0f} ms")
            figures = measure({k: origin + v for k, v in paths.items()}, args)
        base_label = "candles 1m, 1,000 candles"
        base = figures[base_label]
        print(f"{'figure':<36} {'req/s':>7} {'p99 ms':>8}   ratio to {base_label} (same run)")
        for label in paths:
            rps, p99 = figures[label]
            print(f"{label:<36} {rps:>7.2f} {p99:>8.0f}   {rps / base[0]:.2f}x")


if __name__ == "__main__":
    main()
