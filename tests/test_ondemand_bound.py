"""On-demand pricing's upstream traffic, end to end: real processes (uvicorn serving Kurs, the
exchange emulator counting every request it serves), one client asking hundreds of distinct
random pairs 20 at a time. Whatever it asks, the exchanges see at most each provider's listing
once per its listing interval (bench/bench_ondemand.py, which this runs, prints the same figures
for 1,000 pairs)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.services import ROOT


def test_distinct_random_pairs_cost_no_more_than_the_listing_refresh_rate() -> None:
    run = subprocess.run(
        [sys.executable, "bench/bench_ondemand.py", "--pairs", "300", "--no-budget", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    statuses = {int(code): count for code, count in figures["statuses"].items()}
    assert sum(statuses.values()) == 300
    assert statuses.get(200, 0) > 30  # priced pairs among them, not only refusals
    assert set(statuses) <= {200, 404}
    # Before the change: about 3 requests per pair here (2,934 for 1,000), whole markets included.
    total = sum(figures["requests"].values())
    assert 0 < total <= figures["bound"], figures
    assert figures["requests"]["binance"] % 2 == 0  # price and book, always together
