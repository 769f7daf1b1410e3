"""Failover and recovery as a user sees them: REST `latest`, `/ws/items` and NATS, real processes.

    .venv/bin/python bench/bench_failover.py [--switches 10] [--poll 2] [--steady 60]
        [--faults down,stale,rate_limited,slow,garbage,garbage_shape,absurd]

A fetcher (`run_fetch --watch`) and a uvicorn web process run against the exchange emulator, a
SQLite file and the machine's NATS (127.0.0.1:4222). For each fault the serving provider is
switched `--switches` times; each time the seconds until every surface shows the next provider
with `status: failover` are recorded, then, after the reset, until the first provider serves
`live` again. The faults: `down` (HTTP 503, streams refused), `stale` (a stalled feed without
errors: Bybit's times freeze and its stream goes silent; the bound adds KURS_STALE_AFTER), and
the other switches `tests/test_faults.py` checks the behaviour of (HTTP 429, answers slower than
a round, garbage bodies, a wrong shape, absurd prices). The bound is one poll plus a second;
each row reports how many switches stayed within it. `tests/test_faults.py` asserts only that
the failover happens: this is where its speed is measured.
The in-run baseline is the NATS subscriber, the event bus itself: REST and WebSocket are shown
as a ratio to it. Last, with prices held still for `--steady` seconds, the `rate.updated` events
per pair per minute: the heartbeat (KURS_STALE_AFTER / 2), and no duplicate versions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from rates.emulator import run_emulator_server  # noqa: E402
from tests.stack import Stack, wait_until, watching  # noqa: E402

SURFACES = ("rest", "ws", "nats")
# The emulator's switch and its options, per fault (`rates.emulator.market.Fault`).
FAULTS: dict[str, dict[str, Any]] = {
    "down": {"mode": "down"},
    "stale": {"mode": "stale"},
    "rate_limited": {"mode": "rate_limited", "retry_after": 1},
    "slow": {"mode": "slow", "delay": 5},  # longer than a round may take
    "garbage": {"mode": "garbage"},
    "garbage_shape": {"mode": "garbage", "variant": "shape"},
    "absurd": {"mode": "absurd"},
}


async def measure(fault: str, switches: int, poll: float) -> dict[str, list[dict[str, float]]]:
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as emulator:
        stack = Stack(
            folder=Path(tempfile.mkdtemp(prefix=f"kurs-bench-{fault}-")),
            emulator=emulator,
            # `stale` is a Bybit fault in the emulator; the others act on any provider.
            providers="bybit,binance" if fault == "stale" else "binance,bybit",
            poll=poll,
            stale_after=4.0,
        )
        stack.migrate(active=("BTC-USD",))
        first, second = stack.providers.split(",")
        stack.fetcher()
        web = stack.web()
        runs: dict[str, list[dict[str, float]]] = {"failover": [], "recovery": []}
        try:
            async with watching(stack, web, "BTC-USD") as watch:
                await wait_until(
                    lambda: set(watch.latest.values()) == {(first, "live")},
                    within=60,
                    what="the first provider serving",
                )
                for _ in range(switches):
                    # At a random moment of the poll cycle, not in step with it.
                    await asyncio.sleep(random.uniform(0, poll))
                    runs["failover"].append(
                        await watch.until(
                            second,
                            "failover",
                            lambda: emulator.set_fault(first, **FAULTS[fault]),
                            within=30,
                        )
                    )
                    await asyncio.sleep(random.uniform(0, poll))
                    runs["recovery"].append(
                        await watch.until(
                            first, "live", lambda: emulator.set_fault(first, "ok"), within=30
                        )
                    )
        finally:
            stack.stop()
        return runs


async def steady(seconds: float, poll: float) -> tuple[dict[str, list[float]], int]:
    """Gaps between rate.updated events of each pair with prices held still; duplicate versions."""
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as emulator:
        stack = Stack(
            folder=Path(tempfile.mkdtemp(prefix="kurs-bench-steady-")),
            emulator=emulator,
            poll=poll,
        )
        stack.migrate(active=("BTC-USD", "ETH-USD"))
        stack.fetcher()
        web = stack.web()
        seen: dict[str, list[tuple[float, int]]] = {}
        try:
            for pair in ("BTC-USD", "ETH-USD"):
                async with watching(stack, web, pair) as watch:
                    first = partial(bool, watch.events)  # the list fills as events arrive
                    await wait_until(first, within=60, what="a first rate")
                    started = len(watch.events)
                    await asyncio.sleep(seconds)  # the measurement window itself
                    seen[pair] = [
                        (at, event["version"])
                        for at, event in zip(watch.arrivals, watch.events, strict=True)
                    ][started - 1 :]
        finally:
            stack.stop()
    gaps = {
        pair: [later[0] - earlier[0] for earlier, later in itertools.pairwise(events)]
        for pair, events in seen.items()
    }
    duplicates = sum(
        n - 1
        for events in seen.values()
        for n in collections.Counter(version for _, version in events).values()
    )
    return gaps, duplicates


def summary(runs: list[dict[str, float]], surface: str) -> tuple[float, float, int]:
    values = [run[surface] for run in runs if surface in run]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.median(values), max(values), len(values)


def report(fault: str, runs: dict[str, list[dict[str, float]]], bound: float) -> None:
    print(f"\n{fault}: {len(runs['failover'])} switches; bound {bound:g} s")
    print(
        f"  {'surface':8} {'phase':9} {'median s':>9} {'max s':>7} {'seen':>5} {'÷ NATS':>7}"
        f" {'in bound':>8}"
    )
    for phase in ("failover", "recovery"):
        base, _, _ = summary(runs[phase], "nats")
        for surface in SURFACES:
            median, worst, seen = summary(runs[phase], surface)
            ratio = median / base if base else float("nan")
            within = sum(1 for run in runs[phase] if run.get(surface, bound + 1) <= bound)
            print(
                f"  {surface:8} {phase:9} {median:9.2f} {worst:7.2f} "
                f"{seen:>3}/{len(runs[phase])} {ratio:7.2f} {within:>5}/{len(runs[phase])}"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--poll", type=float, default=2.0)
    parser.add_argument(
        "--steady", type=float, default=60.0, help="seconds of steady prices (heartbeats: 15 s)"
    )
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}"
    )
    options = parser.parse_args()
    print(f"cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f} at start")
    started = time.monotonic()
    for fault in options.faults.split(","):
        if fault not in FAULTS:
            parser.error(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
        runs = await measure(fault, options.switches, options.poll)
        bound = options.poll + 1 + (4.0 if fault == "stale" else 0)
        report(fault, runs, bound)
    gaps, duplicates = await steady(options.steady, options.poll)
    print(f"\nsteady prices for {options.steady:g} s, KURS_STALE_AFTER 30 (heartbeat 15 s):")
    for pair, between in gaps.items():
        if not between:  # --steady shorter than a heartbeat: no gap between two events yet
            print(f"  {pair}: fewer than two rate.updated in {options.steady:g} s")
            continue
        print(
            f"  {pair}: {len(between)} rate.updated, gaps {min(between):.1f}-{max(between):.1f} s"
            f" (heartbeat 15 s + up to one {options.poll:g} s poll): "
            f"{60 / statistics.mean(between):.1f} per minute"
        )
    print(f"  duplicate versions: {duplicates}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
