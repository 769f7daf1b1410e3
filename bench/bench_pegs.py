"""USDT at 0.97: what BTC-USD (served from BTCUSDT through the USD proxy) is worth to a client,
without the peg check and with it, and how soon everyone hears `peg.broken`. Real processes.

    .venv/bin/python bench/bench_pegs.py [--runs 5] [--poll 2]

A fetcher (`run_fetch --watch`, providers binance, bybit, coingecko) and a uvicorn web process
run against the exchange emulator (prices held still), a SQLite file and the machine's NATS.
Each run switches the emulator's `depeg` scenario on (USDT at 0.97 USD on every exchange and on
CoinGecko; CoinGecko's BTC-USD stays true) at a random moment of the poll cycle, then off.

- **before** (`KURS_PEGS` empty, the check off): the error of BTC-USD on REST `latest` one poll
  after the switch, against the true price (CoinGecko's BTC-USD), and its status.
- **after** (`KURS_PEGS=USDT:USD:0.01`, the default): the same error, the seconds until each
  surface (REST `latest`, `/ws/items`, the SSE stream, NATS) shows BTC-USD as `depeg`, and until
  each hears `peg.broken` (REST: `GET /api/v1/pegs` says broken). The in-run baseline of the
  times is the NATS subscriber (the event bus itself); the errors' baseline is the check off.

Medians over the runs; the machine is shared (say so when quoting).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from rates.emulator import EmulatorServer, run_emulator_server  # noqa: E402
from tests.stack import Process, Stack, Watchers, wait_until, watching  # noqa: E402

PAIR = "BTC-USD"
DEPEG = "0.97"
SURFACES = ("rest", "ws", "sse", "nats")


class PegEars:
    """When REST (`GET /api/v1/pegs`) and NATS first said a peg is broken since `reset()`; the
    WebSocket and the stream are heard by the pair's watchers (`Watchers.heard`)."""

    def __init__(self, stack: Stack, web: Process, watch: Watchers) -> None:
        self.stack, self.web, self.watch = stack, web, watch
        self.heard: dict[str, float] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        self.heard = {}
        self.watch.heard.pop("peg.broken", None)

    def times(self, started: float) -> dict[str, float]:
        heard = {**self.watch.heard.get("peg.broken", {}), **self.heard}
        return {surface: round(at - started, 3) for surface, at in heard.items()}

    async def _rest(self) -> None:
        url = f"http://127.0.0.1:{self.web.port}/api/v1/pegs"
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    pegs = (await client.get(url)).json()
                    if any(peg["state"] == "broken" for peg in pegs):
                        self.heard.setdefault("rest", time.monotonic())
                await asyncio.sleep(0.05)

    async def _nats(self) -> None:
        client = await nats.connect(self.stack.nats_url)
        try:
            queue: asyncio.Queue[Any] = asyncio.Queue()
            await client.subscribe(f"{self.stack.prefix}.peg.broken", cb=queue.put)
            while True:
                await queue.get()
                self.heard.setdefault("nats", time.monotonic())
        finally:
            await client.close()

    async def __aenter__(self) -> PegEars:
        self.tasks = [asyncio.create_task(self._rest()), asyncio.create_task(self._nats())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def latest(web: Process, item_id: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{web.port}/api/v1/items/{item_id}/rates/latest"
    async with httpx.AsyncClient(timeout=5) as client:
        body: dict[str, Any] = json.loads((await client.get(url)).text, parse_float=Decimal)
        return body


def error(value: Decimal, true: Decimal) -> float:
    return float(abs(value / true - 1))


async def measure(pegs: str, runs: int, poll: float) -> list[dict[str, Any]]:
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as emulator:
        stack = Stack(
            folder=Path(tempfile.mkdtemp(prefix="kurs-bench-pegs-")),
            emulator=emulator,
            providers="binance,bybit,coingecko",
            poll=poll,
            extra_env={"KURS_PEGS": pegs},
        )
        stack.migrate(active=(PAIR, "USDTTRC-USD"))
        stack.fetcher()
        web = stack.web()
        item = stack.item_id(PAIR)
        results = []
        try:
            async with (
                watching(stack, web, PAIR, SURFACES) as watch,
                PegEars(stack, web, watch) as ears,
            ):
                await wait_until(
                    lambda: set(watch.latest.values()) == {("binance", "live")},
                    within=60,
                    what="binance serving BTC-USD live",
                )
                for _ in range(runs):
                    results.append(await one_run(emulator, watch, ears, web, item, pegs, poll))
        finally:
            stack.stop()
        return results


async def one_run(
    emulator: EmulatorServer,
    watch: Watchers,
    ears: PegEars,
    web: Process,
    item: int,
    pegs: str,
    poll: float,
) -> dict[str, Any]:
    await asyncio.sleep(random.uniform(0, poll))
    true = emulator.market.books["coingecko"].prices["bitcoin.usd"]
    ears.reset()
    started = time.monotonic()
    shown: dict[str, float] = {}
    if pegs:
        shown = await watch.until(
            "binance", "depeg", lambda: emulator.set_depeg(DEPEG), within=3 * poll
        )
    else:
        emulator.set_depeg(DEPEG)
    await asyncio.sleep(max(0.0, started + poll - time.monotonic()))  # one poll after the switch
    body = await latest(web, item)
    run = {
        "error": error(body["value"], true),
        "status": body["status"],
        "shown": shown,
        "heard": ears.times(started),
    }
    # Back to parity; with the check on, restored after its 10 s hold, then served live again.
    await watch.until("binance", "live", lambda: emulator.set_depeg("1"), within=30)
    return run


def median_of(runs: list[dict[str, Any]], key: str, surface: str) -> float:
    values = [run[key][surface] for run in runs if surface in run[key]]
    return statistics.median(values) if values else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--poll", type=float, default=2.0)
    options = parser.parse_args()
    print(f"cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f} at start")
    began = time.monotonic()
    before = await measure("", options.runs, options.poll)
    after = await measure("USDT:USD:0.01", options.runs, options.poll)
    off = statistics.median(run["error"] for run in before)
    on = statistics.median(run["error"] for run in after)
    print(f"\nUSDT at {DEPEG} USD, {options.runs} runs each, poll {options.poll:g} s")
    print("BTC-USD on REST latest one poll after the switch, error against the true price:")
    worst_off, worst_on = max(r["error"] for r in before), max(r["error"] for r in after)
    print(f"  peg check off: median {off:.4%} (max {worst_off:.4%}), ", end="")
    print(f"status {sorted({r['status'] for r in before})}")
    print(f"  peg check on:  median {on:.6%} (max {worst_on:.6%}), ", end="")
    print(f"status {sorted({r['status'] for r in after})}; ratio on/off {on / off:.3f}")
    print("\nseconds from the switch (medians; ÷ NATS: ratio to the event bus):")
    print(f"  {'surface':8} {'depeg shown':>11} {'÷ NATS':>7} {'peg.broken':>10} {'÷ NATS':>7}")
    shown_base = median_of(after, "shown", "nats")
    heard_base = median_of(after, "heard", "nats")
    for surface in SURFACES:
        shown = median_of(after, "shown", surface)
        heard = median_of(after, "heard", surface)
        print(
            f"  {surface:8} {shown:11.2f} {shown / shown_base:7.2f} {heard:10.2f}"
            f" {heard / heard_base:7.2f}"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
