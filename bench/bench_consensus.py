"""One exchange 5 % off, as a user sees it under `priority` and under `consensus` pricing.

    .venv/bin/python bench/bench_consensus.py [--runs 10] [--poll 2] [--skew 5] [--decides 20000]

Real processes: the exchange emulator (prices held still), a fetcher (`run_fetch --watch`) and
a uvicorn web process on a SQLite file and the machine's NATS, providers binance, bybit and
coingecko, one pair (BTC-USD). For each pricing, `--runs` times: at a random moment Binance's
prices go `--skew` % off (the emulator's `skew` fault: well-formed, inside KURS_MAX_JUMP), and

- the **error** of the served value against the true price (the median of the three books
  before the skew) is read on REST one poll after the skew starts (the target under consensus:
  at most 0.1 %), and its maximum over the poll that follows;
- under consensus, the seconds until each surface shows Binance **excluded** in the sources of
  the rate it shows: REST `latest?expand=sources`, the WebSocket and the SSE stream with
  `expand=sources`, and NATS (`rate.updated`, with the `quote.excluded` of the same version); the
  bound is one poll plus a second. The in-run baseline is NATS, the bus.

Then the fault is reset and the next run waits until Binance agrees again. Last, in this
process, the cost of the decide step per accepted quote (three fresh sources on the board):
`rates.services.decide` under consensus against the same under priority (the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")


from rates.emulator import run_emulator_server  # noqa: E402
from tests.stack import Stack, Watchers, wait_until, watching  # noqa: E402

PAIR = "BTC-USD"
SURFACES = ("rest", "ws", "sse", "nats")


def truth(emulator: Any) -> Decimal:
    books = emulator.market.books
    values: list[Decimal] = [
        books["binance"].prices["BTCUSDT"],
        books["bybit"].prices["BTCUSDT"],
        books["coingecko"].prices["bitcoin.usd"],
    ]
    return sorted(values)[1]


class Exclusions:
    """When each surface first showed Binance excluded (from the sources of what it showed),
    while armed: a listener of the pair's `Watchers`."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.armed = False

    def __call__(self, surface: str, payload: dict[str, Any]) -> None:
        sources = payload.get("sources") or []
        if self.armed and any(s["provider"] == "binance" and s["excluded"] for s in sources):
            self.at.setdefault(surface, time.monotonic())


def served(watch: Watchers) -> Decimal | None:
    latest = watch.payloads.get("rest")
    return None if latest is None else Decimal(str(latest["value"]))


def error_pct(value: Decimal | None, true: Decimal) -> float:
    return float("nan") if value is None else float(abs(value - true) / true * 100)


async def measure(pricing: str, runs: int, poll: float, skew: float) -> list[dict[str, float]]:
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as emulator:
        stack = Stack(
            folder=Path(tempfile.mkdtemp(prefix=f"kurs-bench-consensus-{pricing}-")),
            emulator=emulator,
            providers="binance,bybit,coingecko",
            poll=poll,
        )
        stack.migrate(active=(PAIR,))
        stack.query("UPDATE items_item SET pricing = ? WHERE code = ?", pricing, PAIR)
        stack.fetcher()
        web = stack.web()
        results: list[dict[str, float]] = []
        try:
            async with watching(stack, web, PAIR, SURFACES, expand="sources") as watch:
                excluded = Exclusions()
                watch.listeners.append(excluded)

                def agreed() -> bool:
                    latest = watch.payloads.get("rest")
                    if latest is None:
                        return False
                    if pricing == "priority":
                        return bool(latest["provider"] == "binance" and latest["status"] == "live")
                    return bool(latest["n_sources"] == 3 and latest["status"] == "live")

                await wait_until(agreed, within=90, what=f"{pricing}: three sources agreeing")
                for _ in range(runs):
                    await asyncio.sleep(random.uniform(0, poll))
                    true = truth(emulator)
                    excluded.at.clear()
                    excluded.armed = True
                    started = time.monotonic()
                    emulator.set_fault("binance", "skew", percent=skew)
                    await asyncio.sleep(poll)
                    row = {"error_at_poll": error_pct(served(watch), true)}
                    worst = row["error_at_poll"]
                    while time.monotonic() - started < 2 * poll:
                        worst = max(worst, error_pct(served(watch), true))
                        await asyncio.sleep(0.05)
                    row["error_max"] = worst
                    if pricing == "consensus":
                        with contextlib.suppress(AssertionError):
                            await wait_until(
                                lambda: len(excluded.at) == len(SURFACES),
                                within=poll + 5,
                                what="binance excluded everywhere",
                            )
                        for surface in SURFACES:
                            at = excluded.at.get(surface)
                            row[surface] = float("nan") if at is None else at - started
                    excluded.armed = False
                    emulator.set_fault("binance", "ok")
                    await wait_until(agreed, within=60, what=f"{pricing}: agreement again")
                    results.append(row)
        finally:
            stack.stop()
        return results


def decide_cost(decides: int) -> tuple[float, float]:
    """µs per `decide` over a board with three fresh sources: (priority, consensus)."""
    import django

    django.setup()
    from django.utils import timezone

    from rates import policy, services
    from rates.board import Entry, PairState

    now = timezone.now()

    def entry(name: str, value: str) -> Entry:
        return Entry(
            provider=name,
            value=Decimal(value),
            source_time=now,
            fresh_until=now + timedelta(seconds=30),
            priority=(0, ["binance", "bybit", "coingecko"].index(name)),
            bid=Decimal(value) - 1,
            ask=Decimal(value) + 1,
        )

    usable = (entry("binance", "97000.12"), entry("bybit", "97003.5"), entry("coingecko", "96990"))
    costs = []
    for mode in (policy.PRIORITY, policy.CONSENSUS):
        step = functools.partial(
            services.decide,
            PAIR,
            PairState(usable, None, (0, 0), (), mode),
            now=now,
            incoming=usable[1],
            monotonic=time.monotonic(),
        )
        step()
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(decides):
                step()
            rounds.append((time.perf_counter() - started) / decides * 1e6)
        costs.append(statistics.median(rounds))
    return costs[0], costs[1]


def median_max(values: list[float]) -> str:
    real = [v for v in values if v == v]
    if not real:
        return "n/a"
    missing = len(values) - len(real)
    text = f"{statistics.median(real):.3f} / {max(real):.3f}"
    return text + (f" ({missing} missed)" if missing else "")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--poll", type=float, default=2.0)
    parser.add_argument("--skew", type=float, default=5.0)
    parser.add_argument("--decides", type=int, default=20000)
    args = parser.parse_args()
    bound = args.poll + 1
    print(f"BTC-USD, binance skewed {args.skew:g} %, poll {args.poll:g} s, {args.runs} runs each")
    print("(a 2-core machine shared with other sessions: figures are noisy)")
    for pricing in ("priority", "consensus"):
        rows = await measure(pricing, args.runs, args.poll, args.skew)
        print(f"\n{pricing}: served error vs the true price, % (median / max over runs)")
        print(f"  one poll after the skew: {median_max([r['error_at_poll'] for r in rows])}")
        print(f"  worst in the next poll:  {median_max([r['error_max'] for r in rows])}")
        if pricing == "consensus":
            print(f"  binance excluded, s after the skew (median / max; bound {bound:g} s):")
            nats_median = statistics.median([r["nats"] for r in rows if r["nats"] == r["nats"]])
            for surface in SURFACES:
                values = [r[surface] for r in rows]
                real = [v for v in values if v == v]
                within = sum(1 for v in real if v <= bound)
                ratio = statistics.median(real) / nats_median if real and nats_median else 0
                print(
                    f"    {surface:5} {median_max(values)}  within bound {within}/{len(values)}"
                    f"  ×{ratio:.2f} of nats"
                )
    priority_us, consensus_us = decide_cost(args.decides)
    print(
        f"\ndecide per accepted quote, three sources: priority {priority_us:.1f} µs (baseline), "
        f"consensus {consensus_us:.1f} µs, ×{consensus_us / priority_us:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
