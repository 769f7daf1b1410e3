"""Soak: Kurs under steady load for half an hour, with one NATS restart in the middle (`make soak`).

    SOAK_SECONDS=300 .venv/bin/python bench/soak.py      # 1800 s by default; not run in CI

What runs, each its own process: the exchange emulator (`run_emulator`, prices moving every
second), the fetcher (`run_fetch --watch`, KURS_POLL_INTERVAL=1, the four built-in providers,
the eight default pairs), one uvicorn web process, a nats-server with JetStream and a redis-server
on free ports, and a PostgreSQL database of the soak's own on the machine's server (dropped at
the end).
This process plays the users: SOAK_WS (200) WebSocket and SOAK_SSE (50) SSE clients on every
pair, each resuming from its last `seq` if it is disconnected, and SOAK_READERS (4) readers
looping over `/courses`, `latest`, `items` and `health` (about 5 requests per second each).
NATS is killed at half time and started again 5 s later.

After a warm-up (a tenth of the run, 10 to 60 s) the baseline is taken: RSS and open descriptors
of every process, and the Rate row count. At the end the same again. It fails (exit 1) when:
- a process's RSS grew by more than 20 % + 32 MiB over its own baseline, or it holds more than
  32 descriptors over its baseline (a leak, not the clients, who are all connected at both ends);
- Rate rows grew faster than one per pair, provider and emulator tick (the storage rule of
  docs/rates.md#history allows no more), or not at all in some sampling interval (writing stalled,
  e.g. across the NATS restart);
- a client received nothing in the last sampling interval, or was told of a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from tests.services import (  # noqa: E402
    POSTGRES_URL,
    NatsServer,
    RedisServer,
    free_port,
    port_open,
    wait_for_port,
)
from tests.stack import Stack, wait_until  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "1800"))
WS_CLIENTS = int(os.environ.get("SOAK_WS", "200"))
SSE_CLIENTS = int(os.environ.get("SOAK_SSE", "50"))
READERS = int(os.environ.get("SOAK_READERS", "4"))
POLL = 1.0
TICK = 1.0
PROVIDERS = ("binance", "bybit", "coingecko", "cbr")
PAIRS: tuple[str, ...] = ("BTC-USD", "ETH-USD", "USDTTRC-USD", "USDTERC-USD", "BTC-RUB", "ETH-RUB")
PAIRS += ("USDTTRC-RUB", "USDTERC-RUB")
RSS_GROWTH = (0.20, 32 * 1024)  # fraction, KiB
FD_GROWTH = 32
SAMPLE_EVERY = 30.0


@dataclass
class RemoteEmulator:
    """The emulator in a process of its own: what `Stack.env` needs of it."""

    port: int

    def rest_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def ws_url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.port}/{name}"


@dataclass
class Client:
    kind: str
    messages: int = 0
    last_at: float = -math.inf  # time.monotonic() of the last message; never: -inf, not 0.0
    seq: int | None = None
    reconnects: int = 0
    gaps: int = 0
    errors: list[str] = field(default_factory=list)

    def heard(self, kind: str, seq: object) -> None:
        self.messages += 1
        self.last_at = time.monotonic()
        if isinstance(seq, int):
            self.seq = seq
        if kind == "gap":
            self.gaps += 1


async def ws_client(base: str, client: Client, stop: asyncio.Event) -> None:
    while not stop.is_set():
        since = f"&since={client.seq}" if client.seq is not None else ""
        try:
            async with ws_connect(f"{base}/ws/items?pairs={','.join(PAIRS)}{since}") as ws:
                async for raw in ws:
                    message = json.loads(raw)
                    client.heard(message["type"], message.get("seq"))
        except Exception as exc:
            client.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        if not stop.is_set():
            client.reconnects += 1
            await asyncio.sleep(0.5)  # a real client's reconnect pause


async def sse_client(base: str, client: Client, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
        while not stop.is_set():
            headers = {"Last-Event-ID": str(client.seq)} if client.seq is not None else {}
            url = f"{base}/api/v1/stream?pairs={','.join(PAIRS)}"
            try:
                async with http.stream("GET", url, headers=headers) as response:
                    kind = ""
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            kind = line.removeprefix("event: ")
                        elif line.startswith("id: "):
                            client.seq = int(line.removeprefix("id: "))
                        elif line.startswith("data: "):
                            client.heard(kind, None)
            except Exception as exc:
                client.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            if not stop.is_set():
                client.reconnects += 1
                await asyncio.sleep(0.5)


async def reader(
    base: str, item_ids: list[int], stop: asyncio.Event, counts: dict[int, int]
) -> None:
    paths = ["/api/v1/courses", "/api/v1/items", "/api/v1/health"]
    paths += [f"/api/v1/items/{item}/rates/latest" for item in item_ids]
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        while not stop.is_set():
            for path in paths:
                try:
                    status = (await http.get(path)).status_code
                except httpx.HTTPError:
                    status = 0
                counts[status] = counts.get(status, 0) + 1
                await asyncio.sleep(0.2)


def sample(pid: int) -> tuple[int, int]:
    """(RSS KiB, open descriptors) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def main() -> int:
    if not port_open("127.0.0.1", 5432):
        print("soak: PostgreSQL is not reachable on 127.0.0.1:5432", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="kurs-soak-"))
    print(
        f"soak: {SECONDS:g} s, {WS_CLIENTS} WebSocket + {SSE_CLIENTS} SSE clients, "
        f"{READERS} readers; logs in {folder}"
    )
    print(f"cores: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f} at start")
    nats = NatsServer(port=free_port(), store_dir=folder / "jetstream")
    redis = RedisServer(port=free_port())
    nats.start()
    redis.start()
    emulator_port = free_port()
    stack = Stack(
        folder=folder,
        emulator=RemoteEmulator(emulator_port),  # type: ignore[arg-type]  # its URLs suffice
        providers=",".join(PROVIDERS),
        poll=POLL,
        nats_url=nats.url,
        database_url=f"{POSTGRES_URL.rsplit('/', 1)[0]}/kurs_soak_{os.getpid()}",
        redis_url=redis.url,
    )
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    failures = ["the soak did not finish"]
    try:
        emulator = stack.spawn(
            "emulator",
            [
                sys.executable,
                "manage.py",
                "run_emulator",
                "--port",
                str(emulator_port),
                "--tick",
                f"{TICK:g}",
                "--seed",
                "7",
            ],
        )
        await asyncio.to_thread(wait_for_port, emulator_port, 30.0)
        await asyncio.to_thread(stack.migrate, active=PAIRS)
        fetcher = stack.fetcher()
        web = await asyncio.to_thread(stack.web)
        base = f"http://127.0.0.1:{web.port}"
        item_ids = [stack.item_id(pair) for pair in PAIRS]
        await wait_until(
            lambda: len(stack.query("SELECT 1 FROM rates_currentrate")) >= len(PAIRS) // 2,
            within=120,
            what="current rates for half the pairs",
        )
        clients = [Client("ws") for _ in range(WS_CLIENTS)] + [
            Client("sse") for _ in range(SSE_CLIENTS)
        ]
        for number, client in enumerate(clients):
            run = ws_client if client.kind == "ws" else sse_client
            tasks.append(
                asyncio.create_task(
                    run(f"ws://127.0.0.1:{web.port}" if client.kind == "ws" else base, client, stop)
                )
            )
            if number % 25 == 24:
                await asyncio.sleep(0.2)  # connect in batches, as users arrive
        counts: dict[int, int] = {}
        tasks += [asyncio.create_task(reader(base, item_ids, stop, counts)) for _ in range(READERS)]
        processes: dict[str, int] = {
            "web": web.popen.pid,
            "fetcher": fetcher.popen.pid,
            "emulator": emulator.popen.pid,
            "nats-server": nats.pid,
            "redis-server": redis.pid,
        }
        warmup = min(60.0, max(10.0, SECONDS / 10))
        await asyncio.sleep(warmup)
        started = time.monotonic()
        baseline = {name: sample(pid) for name, pid in processes.items()}
        rows_start = int(stack.query("SELECT count(*) FROM rates_rate")[0][0])
        intervals: list[tuple[float, int]] = []
        rows_before, restarted = rows_start, False
        nats_back = None
        while (elapsed := time.monotonic() - started) < SECONDS:
            await asyncio.sleep(min(SAMPLE_EVERY, SECONDS - elapsed))
            if not restarted and time.monotonic() - started >= SECONDS / 2:
                restarted = True
                await asyncio.to_thread(nats.kill)
                await asyncio.sleep(5)
                processes["nats-server"] = await asyncio.to_thread(restart_nats, nats)
                nats_back = await nats_recovery(base)
            rows = int(stack.query("SELECT count(*) FROM rates_rate")[0][0])
            intervals.append((time.monotonic() - started, rows - rows_before))
            rows_before = rows
            print(
                f"  t={intervals[-1][0]:6.0f}s rows +{intervals[-1][1]:5d}  web "
                f"{sample(processes['web'])[0] / 1024:6.1f} MiB  "
                f"ws msgs {sum(c.messages for c in clients if c.kind == 'ws'):9d}",
                flush=True,
            )
        duration = time.monotonic() - started
        end = {name: sample(pid) for name, pid in processes.items()}
        rows_end = int(stack.query("SELECT count(*) FROM rates_rate")[0][0])
        quiet = [c for c in clients if time.monotonic() - c.last_at > SAMPLE_EVERY]
        failures = report(
            baseline,
            end,
            rows_start,
            rows_end,
            duration,
            intervals,
            clients,
            quiet,
            counts,
            nats_back,
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(stack.stop)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(stack.drop_database)
        nats.stop()
        redis.kill()
    for failure in failures:
        print(f"FAIL: {failure}")
    print("soak: ok" if not failures else f"soak: {len(failures)} failure(s)")
    return 1 if failures else 0


def restart_nats(nats: NatsServer) -> int:
    nats.start()
    return nats.pid


async def nats_recovery(base: str) -> float:
    """Seconds from the restart until the web process's health says NATS is ok again."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() - started < 60:
            body = (await http.get(f"{base}/api/v1/health")).json()
            if body["components"]["nats"]["status"] == "ok":
                return time.monotonic() - started
            await asyncio.sleep(0.1)
    return float("inf")


def report(
    baseline: dict[str, tuple[int, int]],
    end: dict[str, tuple[int, int]],
    rows_start: int,
    rows_end: int,
    duration: float,
    intervals: list[tuple[float, int]],
    clients: list[Client],
    quiet: list[Client],
    counts: dict[int, int],
    nats_back: float | None,
) -> list[str]:
    failures = []
    print(f"\nafter {duration:.0f} s (baseline taken after the warm-up, in this run):")
    print(
        f"  {'process':13} {'RSS start':>10} {'RSS end':>9} {'ratio':>6} {'fds start':>9} "
        f"{'fds end':>8}"
    )
    for name, (rss0, fds0) in baseline.items():
        rss1, fds1 = end[name]
        print(
            f"  {name:13} {rss0 / 1024:8.1f}Mi {rss1 / 1024:7.1f}Mi {rss1 / rss0:6.2f} "
            f"{fds0:9d} {fds1:8d}"
        )
        if name == "nats-server":
            continue  # restarted midway: its baseline is another process
        if rss1 > rss0 * (1 + RSS_GROWTH[0]) + RSS_GROWTH[1]:
            failures.append(f"{name} RSS grew {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB")
        if fds1 > fds0 + FD_GROWTH:
            failures.append(f"{name} descriptors grew {fds0} -> {fds1}")
    growth = rows_end - rows_start
    bound = len(PAIRS) * len(PROVIDERS) * duration / TICK
    print(
        f"  Rate rows: {rows_start} -> {rows_end} (+{growth}, {growth / duration:.2f}/s; "
        f"bound {bound / duration:.0f}/s: one per pair, provider and tick)"
    )
    if growth > bound:
        failures.append(f"Rate rows grew {growth}, over the bound {bound:.0f}")
    stalled = [at for at, added in intervals if added == 0]
    if stalled:
        failures.append(f"no Rate row written in the intervals ending at {stalled}")
    for kind in ("ws", "sse"):
        group = [c for c in clients if c.kind == kind]
        print(
            f"  {kind:3} clients {len(group)}: {sum(c.messages for c in group)} messages, "
            f"{sum(c.reconnects for c in group)} reconnects, {sum(c.gaps for c in group)} gaps, "
            f"{sum(1 for c in quiet if c.kind == kind)} quiet at the end"
        )
    print(f"  reads: {dict(sorted(counts.items()))}")
    print(f"  NATS restart: health ok again {nats_back:.2f} s after it was started again")
    if quiet:
        failures.append(f"{len(quiet)} clients heard nothing in the last {SAMPLE_EVERY:g} s")
    if any(c.gaps for c in clients):
        failures.append("a client was told of a gap")
    if set(counts) - {200}:
        failures.append(f"reads answered other than 200: {counts}")
    errors = sorted({e for c in clients for e in c.errors})
    if errors:
        print(f"  client errors (first 5 kinds): {errors[:5]}")
    return failures


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
