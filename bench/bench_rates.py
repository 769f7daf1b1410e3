"""Rates pipeline latency and failover time, each next to an in-run baseline.

    .venv/bin/python bench/bench_rates.py [--changes 200] [--repeats 3]

1. Stream latency: a price set in the exchange emulator's Binance book → the Rate row (post_save)
   and → the `rate.updated` event (published after commit), through the real path of
   `run_fetch --watch`: the emulator's WebSocket, `stream_forever`, `accept_quote`, the database.
   Baselines measured in the same run: a bare websockets client on the same stream (the transport
   floor), and `accept_quote` alone on an already-parsed quote (the service cost).
2. Failover: binance is switched to `down` while it serves BTC-USD; the time until `rate.updated`
   names bybit, next to the poll interval (the design bound is one interval plus the round).

The emulator runs on its own event loop in a thread; SQLite on a temporary file (the default
backend of `make run`). Each figure is the median over `--repeats` runs: the machine is noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_tmp = tempfile.mkdtemp(prefix="kurs-bench-rates-")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ["DATABASE_URL"] = f"sqlite:///{_tmp}/bench.sqlite3"
os.environ.setdefault("KURS_LOG_LEVEL", "ERROR")

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402
from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db.models.signals import post_save  # noqa: E402
from django.utils import timezone  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from items.models import Item  # noqa: E402
from rates import services  # noqa: E402
from rates.board import QuoteBoard  # noqa: E402
from rates.emulator import EmulatorServer, run_emulator_server  # noqa: E402
from rates.fetcher import Fetcher  # noqa: E402
from rates.models import Rate  # noqa: E402
from rates.providers import Pair, Quote, build_providers  # noqa: E402
from rates.providers.streaming import stream_forever  # noqa: E402
from realtime import events  # noqa: E402

WAIT = 5.0  # seconds to wait for one change before calling it lost


class EmulatorThread:
    """The emulator on its own loop, so that its work does not sit in the measured loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.server: EmulatorServer | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),))

    async def _serve(self) -> None:
        # log_level: the emulator refuses upgrades while binance is down, and uvicorn logs each.
        async with run_emulator_server(
            host="127.0.0.1", port=0, tick=3600, seed=1, log_level="critical"
        ) as server:
            self.server = server
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> EmulatorServer:
        self.thread.start()
        self.ready.wait(10)
        assert self.server is not None
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def set_price(self, price: Decimal) -> float:
        """Set BTCUSDT in the emulator's loop; returns perf_counter() at the change."""
        done: asyncio.Future[float] = asyncio.Future(loop=self.loop)

        def change() -> None:
            assert self.server is not None
            started = time.perf_counter()
            self.server.market.books["binance"].set("BTCUSDT", price)
            done.set_result(started)

        self.loop.call_soon_threadsafe(change)
        return asyncio.run_coroutine_threadsafe(_result(done), self.loop).result(WAIT)

    def set_fault(self, provider: str, mode: str) -> None:
        assert self.server is not None
        server = self.server
        self.loop.call_soon_threadsafe(lambda: server.set_fault(provider, mode))


async def _result(future: asyncio.Future[float]) -> float:
    return await future


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def prices(count: int, start: int) -> list[Decimal]:
    return [Decimal(90000) + Decimal(start + i) / 100 for i in range(count)]


async def until(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.perf_counter() + within
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.0005)
    return True


# --- 1. stream latency ------------------------------------------------------------------------
async def bare_client(emu: EmulatorThread, server: EmulatorServer, count: int) -> list[float]:
    """Price change → a plain websockets client on the same Binance stream has the frame."""
    url = f"{server.ws_url('binance')}/stream?streams=btcusdt@ticker"
    latencies = []
    async with connect(url) as socket:
        await socket.recv()  # the current ticker, sent on connect
        for price in prices(count, start=1):
            started = await asyncio.to_thread(emu.set_price, price)
            wanted = f'"c":"{price:.8f}"'
            while wanted not in (frame := await asyncio.wait_for(socket.recv(), WAIT)):
                del frame
            latencies.append(time.perf_counter() - started)
    return latencies


async def pipeline(
    emu: EmulatorThread, server: EmulatorServer, count: int, start: int
) -> tuple[list[float], list[float]]:
    """Price change → Rate row (post_save) and → `rate.updated`, through stream_forever."""
    row_at: dict[Decimal, float] = {}
    event_at: dict[Decimal, float] = {}

    def on_row(sender: type[Rate], instance: Rate, created: bool, **kwargs: Any) -> None:
        row_at.setdefault(instance.value.normalize(), time.perf_counter())

    def on_event(subject: str, envelope: dict[str, Any], payload: str) -> None:
        if envelope["type"] == "rate.updated" and envelope["data"]["direction"] == "BTC-USD":
            event_at.setdefault(Decimal(envelope["data"]["value"]).normalize(), time.perf_counter())

    post_save.connect(on_row, sender=Rate)
    events.add_transport(on_event)
    stop = asyncio.Event()
    accept = sync_to_async(services.accept_quote)
    streaming = asyncio.Event()

    async def on_quote(quote: Quote) -> None:
        await accept(quote)

    async with httpx.AsyncClient() as client:
        (provider,) = build_providers(["binance"], client=client)
        task = asyncio.create_task(
            stream_forever(
                provider,
                [Pair("BTC", "USD")],
                on_quote,
                stop=stop,
                on_state=lambda state, reason: streaming.set() if state == "streaming" else None,
            )
        )
        await asyncio.wait_for(streaming.wait(), WAIT)
        to_row, to_event = [], []
        for price in prices(count, start=start):
            started = await asyncio.to_thread(emu.set_price, price)
            key = price.normalize()
            if await until(partial(operator.contains, event_at, key), WAIT):
                to_row.append(row_at[key] - started)
                to_event.append(event_at[key] - started)
        stop.set()
        await task
    post_save.disconnect(on_row, sender=Rate)
    events.remove_transport(on_event)
    return to_row, to_event


def accept_alone(count: int, start: int) -> list[float]:
    """accept_quote on a parsed quote: validation, board, one SELECT + INSERT, the event."""
    latencies = []
    for price in prices(count, start=start):
        quote = Quote("binance", "BTC-USD", price, timezone.now())
        started = time.perf_counter()
        services.accept_quote(quote)
        latencies.append(time.perf_counter() - started)
    return latencies


# --- 2. failover --------------------------------------------------------------------------------
async def failover(
    emu: EmulatorThread, server: EmulatorServer, poll: float, rounds: int
) -> list[float]:
    """binance (serving BTC-USD, streaming) goes down at a random moment of the poll period →
    seconds until `rate.updated` names bybit; then binance comes back and takes over again."""
    serving: list[tuple[float, str]] = []

    def on_event(subject: str, envelope: dict[str, Any], payload: str) -> None:
        if envelope["type"] == "rate.updated" and envelope["data"]["direction"] == "BTC-USD":
            serving.append((time.perf_counter(), envelope["data"]["provider"]))

    def now_serving() -> str | None:
        return serving[-1][1] if serving else None

    events.add_transport(on_event)
    stop = asyncio.Event()
    took: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(poll)) as client:
        watcher = Fetcher(build_providers(["binance", "bybit"], client=client), poll_interval=poll)
        task = asyncio.create_task(watcher.watch(stop))
        try:
            for _ in range(rounds):
                cycles = watcher.cycles

                def binance_serves_again(cycles: int = cycles) -> bool:
                    return now_serving() == "binance" and watcher.cycles > cycles

                if not await until(binance_serves_again, 4 * poll + 5):
                    break
                await asyncio.sleep(random.uniform(0, poll))
                down_at = time.perf_counter()
                emu.set_fault("binance", "down")
                if not await until(lambda: now_serving() == "bybit", 4 * poll + 5):
                    break
                took.append(
                    next(t for t, name in serving if t >= down_at and name == "bybit") - down_at
                )
                emu.set_fault("binance", "ok")
        finally:
            emu.set_fault("binance", "ok")
            stop.set()
            await task
            events.remove_transport(on_event)
    return took


def fresh_state() -> None:
    services._board = QuoteBoard()
    from rates import provider_health

    provider_health._monitors.clear()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


async def main(changes: int, repeats: int, poll: float) -> None:
    runs: dict[str, list[float]] = {
        key: []
        for key in (
            "bare_p50",
            "bare_p99",
            "row_p50",
            "row_p99",
            "event_p50",
            "event_p99",
            "accept_p50",
            "accept_p99",
        )
    }
    failovers: list[float] = []
    lost = 0
    emu = EmulatorThread()
    with emu as server:
        settings.KURS_PROVIDER_URLS = {
            name: {"rest": server.rest_url(name), "ws": server.ws_url(name)}
            for name in ("binance", "bybit")
        }
        for repeat in range(repeats):
            fresh_state()
            bare = await bare_client(emu, server, changes)
            to_row, to_event = await pipeline(emu, server, changes, start=(repeat + 1) * 10_000)
            lost += changes - len(to_event)
            fresh_state()
            alone = await sync_to_async(accept_alone)(changes, (repeat + 1) * 10_000 + 5_000)
            for name, values in (
                ("bare", bare),
                ("row", to_row),
                ("event", to_event),
                ("accept", alone),
            ):
                runs[f"{name}_p50"].append(statistics.median(values))
                runs[f"{name}_p99"].append(percentile(values, 0.99))
            fresh_state()
            failovers += await failover(emu, server, poll, rounds=3)
    med = {key: statistics.median(values) for key, values in runs.items()}
    print(f"rates pipeline, {changes} price changes x {repeats} runs (medians of runs)")
    print(
        f"  baseline  emulator -> bare websocket client   p50 {ms(med['bare_p50'])}"
        f"   p99 {ms(med['bare_p99'])}"
    )
    print(
        f"  baseline  accept_quote alone                  p50 {ms(med['accept_p50'])}"
        f"   p99 {ms(med['accept_p99'])}"
    )
    for name, label in (("row", "Rate row"), ("event", "rate.updated")):
        p50, p99 = med[f"{name}_p50"], med[f"{name}_p99"]
        print(
            f"  change -> {label:<14}                       p50 {ms(p50)}   p99 {ms(p99)}"
            f"   ({p50 / med['bare_p50']:.1f}x / {p99 / med['bare_p99']:.1f}x the bare client)"
        )
    if lost:
        print(f"  lost changes (no event within {WAIT:g}s): {lost}")
    if failovers:
        median = statistics.median(failovers)
        print(
            f"failover binance down -> bybit published: median {median:.2f} s, "
            f"max {max(failovers):.2f} s over {len(failovers)} failovers "
            f"(poll interval {poll:g} s: {median / poll:.2f}x)"
        )
    else:
        print("failover: no run completed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll", type=float, default=1.0, help="poll interval for failover")
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    Item.objects.filter(code="BTC-USD").update(is_active=True)
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    asyncio.run(main(args.changes, args.repeats, args.poll))
