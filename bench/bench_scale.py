"""Cost as the work grows: the owner, the snapshot, `/courses`, fan-out at 8, 100, 1,000 pairs.

    .venv/bin/python bench/bench_scale.py [--pairs 8,100,1000] [--repeats 2] [--window 20]
        [--fanout 1000,5000] [--database-url postgres://postgres@127.0.0.1:5432/kurs_scale20]
        [--profile DIR]      # py-spy the owner during each largest-scale window (folded stacks)
        [--owners 2 --shards 2]  # sharded ownership: M owner processes, KURS_OWNER_SHARDS=N

Real processes, as in production, started anew for each scale and run: the exchange emulator
(`run_emulator --synthetic-pairs N`: N coins SYN0001.. on Binance and Bybit, every book moving
once a second, spread over the second in --walk-slices slices as an exchange spreads its
updates; `--walk-slices 1` moves them all at the same instant, the worst case), a
nats-server with JetStream, the owner (`run_fetch --watch`, Binance and Bybit streams plus its
REST cadence) and the web server as scripts/serve.sh starts it (uvicorn, 2 workers, uvloop,
Kurs's HTTP and WebSocket protocols) on PostgreSQL (a database of the bench's
own, emptied before each run). Kurs tracks exactly the N pairs `SYNnnnn-USDT`.

In each run, over --window seconds once every pair has a rate:
- the owner: ticks the emulator sent it (stream frames), quotes it accepted per second (streams
  and REST rounds), rate events it published per second, and its CPU (% of one core);
- none dropped: every Binance tick (Binance serves every pair) seen by a bare client on the
  emulator's stream with a new price must reach a WebSocket client of `/ws/items` (every pair) as
  a `rate.updated` with that tick's `source_time`; the share that did (a tick whose price a REST
  round brought first is published with the round's time, and counts as missing here: a few
  percent at 8 pairs, with a round every 5 s);
- tick -> socket: the socket's arrival time minus the tick's time (the emulator's `E`, same
  clock), median and p99, beside the bare client's own tick -> arrival on the emulator's stream;
- where the CPU went in the window: the emulator, the owner(s), the web server (its workers
  included), nats-server and PostgreSQL (every process of that name on the machine), this
  bench's own clients, everything else, and all together (the machine's 2 cores are 200 %):
  whether the set fits the machine at all. Processes that start and end within the window
  are not seen (the load average still shows them);
- `/courses` (every pair): wrk req/s (`-t1 -c64`) and the body's size;
- snapshot memory: the RSS of each web worker (mean), as a delta over the 8-pair run's;
- fan-out: --fanout sockets, each following one pair (round robin), deliveries/s against what the
  owner published for those pairs, and tick -> socket p99 (every 10th socket timed).
Every figure is printed beside the smallest scale's (the in-run baseline) as a ratio, medians of
--repeats runs. Sockets that follow every pair, by the thousand, at 1,000 pairs would be a million
frames a second: not measured (see docs/scaling.md).

With --owners M and --shards N (KURS_OWNER_SHARDS, docs/architecture.md#sharded-ownership), M
owner processes share the N shards; the owner's figures (quotes accepted, events published, CPU)
are summed over them, and the shards each holds are printed before each window.

The machine's cores are shared with everything else running: the load average and the busiest
other processes are printed; absolute figures are low and noisy, prefer the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_realtime import Client, Processes, percentile  # noqa: E402
from rss_sample import rss_kib, web_processes  # noqa: E402
from wrk import cpu_times, neighbours, wrk  # noqa: E402

from tests.services import free_port, wait_for_port  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
DATABASE_URL = "postgres://postgres@127.0.0.1:5432/kurs_scale20"
COURSES = "/api/v1/courses"
WEB_WORKERS = 2
# As the provider does (rates/providers/binance.py): 200 streams in the URL, the rest subscribed.
URL_STREAMS = 200
# How long the stack may take to give every pair a rate, and the fan-out sockets to open.
SETTLE_TIMEOUT = 150.0
# A tick this close to a window's edge may legitimately reach the socket after it closed.
EDGE = 3.0
# After a window, how long its ticks may still take to reach the socket: later counts as lost.
GRACE = 10.0
# A profiled thread whose samples end here is waiting for work (its event loop, its executor).
IDLE = ("EpollSelector.select (", "_PollLikeSelector.select (", "_worker (thread.py:81)")
# Tables emptied before each run (the schema is migrated once).
# Emptied before each run. The outbox and the served log too: undelivered events of an earlier
# run (an owner stopped mid-burst) would be relayed by the next one.
TABLES = (
    "rates_rate",
    "rates_currentrate",
    "rates_servedrate",
    "realtime_outboxevent",
    "rates_ownerlease",
    "items_item",
)

nan = float("nan")
Tick = tuple[str, int, float]  # (pair, tick time in ms, arrival)

ITEMS = """
from items.models import Item
Item.objects.all().delete()
Item.objects.bulk_create(
    Item(base=f"SYN{n:04d}", quote="USDT", code=f"SYN{n:04d}-USDT") for n in range(1, {n} + 1)
)
"""


# --- processes --------------------------------------------------------------------------------
def stack_env(args: argparse.Namespace, nats_port: int, emulator_port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KURS_", "DJANGO_", "DATABASE_URL", "REDIS_URL", "NATS_URL"))
    }
    emulator = f"127.0.0.1:{emulator_port}"
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="kurs-bench-secret-key-not-for-production-0123456789",
        DATABASE_URL=args.database_url,
        NATS_URL=f"nats://127.0.0.1:{nats_port}",
        KURS_NATS_PREFIX=f"scale{uuid.uuid4().hex[:8]}",
        KURS_PROVIDERS="binance,bybit",
        KURS_OWNER_SHARDS=str(args.shards),
        KURS_LOG_LEVEL=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        KURS_WS_HEARTBEAT="3600",
        KURS_RATE_LIMIT="",
        KURS_MAX_CONNECTIONS_PER_CLIENT="100000",
        KURS_BINANCE_REST_URL=f"http://{emulator}/binance",
        KURS_BINANCE_WS_URL=f"ws://{emulator}/binance",
        KURS_BYBIT_REST_URL=f"http://{emulator}/bybit",
        KURS_BYBIT_WS_URL=f"ws://{emulator}/bybit",
        PYTHONPATH=str(REPO),
    )
    return env


def serve_cmd(port: int) -> list[str]:
    """scripts/serve.sh's uvicorn, on `port`."""
    return [
        str(VENV_BIN / "uvicorn"), "config.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(WEB_WORKERS),
        "--loop", "uvloop", "--http", "edge.serverprotocol:KursHttpProtocol",
        "--lifespan", "on", "--no-access-log", "--no-proxy-headers",
        "--ws", "realtime.wsprotocol:KursWebSocketProtocol", "--ws-max-size", "65536",
    ]  # fmt: skip


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on `pid` for `seconds`: every thread's wall clock (idle too), folded stacks."""
    return subprocess.Popen(
        [str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-r", "100", "-d", f"{seconds:g}",
         "-f", "raw", "-o", str(out), "--nonblocking", "--idle", "--threads"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_nats(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A nats-server with JetStream, of the bench's own."""
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "nats-server"), "-a", "127.0.0.1", "-p", str(port),
         "-js", "-sd", str(workdir / "jetstream")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return process, port


def migrate(args: argparse.Namespace) -> None:
    env = stack_env(args, 0, 0)
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=REPO, env=env, check=True
    )


def empty_database(database_url: str, pairs: int, env: dict[str, str]) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    script = ITEMS.replace("{n}", str(pairs))
    subprocess.run([PYTHON, "manage.py", "shell", "-c", script], cwd=REPO, env=env, check=True)


# An overloaded owner (or emulator) at 1,000 pairs on shared cores can take seconds to answer.
HTTP_TIMEOUT = 60


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return json.loads(response.read())


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return bytes(response.read())


def metric(text: str, name: str) -> float:
    """The sum of every sample of one Prometheus metric in `text` (every label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process now."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        found[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    return found


def cpu_by_part(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    roots: dict[str, list[int]],
    seconds: float,
) -> dict[str, float]:
    """CPU over the window (% of one core) of each part of the set (a process and its
    children: the web server's workers), PostgreSQL's and nats-server's processes by name, this
    bench, and everything else; `cpu_total` of all (the machine: 100 per core)."""
    tree = parents()
    owner_of = {pid: part for part, pids in roots.items() for pid in pids}

    def root_part(pid: int) -> str | None:
        while pid and pid not in owner_of:
            pid = tree.get(pid, 0)
        return owner_of.get(pid)

    used = dict.fromkeys([*roots, "postgres", "nats-server", "bench", "other"], 0.0)
    for pid, (name, total) in after.items():
        if pid == os.getpid():
            part = "bench"
        elif name in ("postgres", "nats-server"):
            part = name
        else:
            part = root_part(pid) or "other"
        # A process that started within the window counts from zero.
        used[part] += max(total - before.get(pid, (name, 0.0))[1], 0.0)
    figures = {f"cpu_{part}": 100 * value / seconds for part, value in used.items()}
    figures["cpu_total"] = 100 * sum(used.values()) / seconds
    return figures


def source_ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso).timestamp() * 1000)


# --- clients ----------------------------------------------------------------------------------
class BareBinance:
    """A bare client on the emulator's Binance stream: every tick (symbol, E) with a new price,
    and its own tick -> arrival latency."""

    def __init__(self, port: int, pairs: int) -> None:
        self.port, self.pairs = port, pairs
        self.last: dict[str, str] = {}
        self.ticks: list[Tick] = []
        self.frames = 0
        self.recording = False

    async def run(self) -> None:
        from websockets.asyncio.client import connect

        streams = [f"syn{n:04d}usdt@ticker" for n in range(1, self.pairs + 1)]
        url = f"ws://127.0.0.1:{self.port}/binance/stream?streams={'/'.join(streams[:URL_STREAMS])}"
        async with connect(url, max_size=None) as ws:
            for number, start in enumerate(range(URL_STREAMS, len(streams), URL_STREAMS), 1):
                params = streams[start : start + URL_STREAMS]
                await ws.send(json.dumps({"method": "SUBSCRIBE", "params": params, "id": number}))
            async for raw in ws:
                arrival = time.time()
                data = json.loads(raw).get("data")
                if data is None:
                    continue
                self.frames += 1
                symbol, price = data["s"], data["c"]
                changed = self.last.get(symbol) not in (None, price)
                self.last[symbol] = price
                if changed and self.recording:
                    pair = symbol.removesuffix("USDT") + "-USDT"
                    self.ticks.append((pair, data["E"], arrival))


class Sockets:
    """`/ws/items` clients: what each `rate.updated` carried (pair, source_time ms) and when it
    arrived; `timed` says which clients are parsed (the others are only counted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.clients: list[Client] = []
        self.timed: set[int] = set()
        self.arrivals: list[Tick] = []
        self.recording = False
        self.snapshots = 0
        self.rate_frames = 0  # `rate.updated` frames to every client while recording

    def on_text(self, client: Client, frame: bytes) -> None:
        if self.recording and b"rate.updated" in frame:
            self.rate_frames += 1
        if id(client) not in self.timed:
            return
        arrival = time.time()
        message = json.loads(frame)
        if message.get("type") == "snapshot":
            self.snapshots += 1
        elif message.get("type") == "rate.updated" and self.recording:
            data = message["data"]
            self.arrivals.append((data["direction"], source_ms(data["source_time"]), arrival))

    async def open(self, paths: list[str], timed_every: int = 1) -> None:
        loop = asyncio.get_running_loop()
        for start in range(0, len(paths), 100):
            batch = [
                loop.create_connection(
                    partial(Client, self.port, path, self.on_text), "127.0.0.1", self.port
                )
                for path in paths[start : start + 100]
            ]
            for index, (_, client) in enumerate(await asyncio.gather(*batch), start):
                self.clients.append(client)
                if index % timed_every == 0:
                    self.timed.add(id(client))
            await asyncio.gather(*(c.opened for c in self.clients[start:]))

    def close(self) -> None:
        for client in self.clients:
            client.close()


# --- one run ----------------------------------------------------------------------------------
async def settle(web: str, pairs: int) -> int:
    """Until `/courses` shows every pair with a value, or SETTLE_TIMEOUT: how many have one (an
    owner that cannot keep up may never rate them all; the run then measures what it does)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    valued = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            body = await asyncio.to_thread(get_json, web + COURSES)
            valued = sum(1 for c in body["courses"] if c.get("value") is not None)
            if valued >= pairs:
                break
        await asyncio.sleep(1)
    else:
        print(f"  {pairs} pairs: only {valued} had a rate after {SETTLE_TIMEOUT:g} s; measuring")
    return valued


def rate_events(metrics_urls: list[str]) -> float:
    """`rate.updated` events the owners published so far: every event they published, less one
    `fetch.completed` per REST cycle (a rare `provider.state` aside)."""
    total = 0.0
    for url in metrics_urls:
        text = get_bytes(url).decode()
        total += metric(text, "kurs_nats_publishes_total")
        total -= metric(text, "kurs_fetch_cycles_total")
    return total


def counters(emulator: str, owners: list[tuple[str, int]]) -> dict[str, float]:
    """The emulator's frames, and the owners' counters and CPU summed: (metrics URL, pid) each."""
    state = get_json(emulator + "/_control")["providers"]
    texts = [get_bytes(url).decode() for url, _ in owners]
    return {
        "binance_frames": state["binance"]["frames_sent"],
        "bybit_frames": state["bybit"]["frames_sent"],
        "accepted": sum(metric(text, "kurs_quotes_accepted_total") for text in texts),
        "rejected": sum(metric(text, "kurs_quotes_rejected_total") for text in texts),
        "published": rate_events([url for url, _ in owners]),
        "cpu": sum(cpu_seconds(pid) for _, pid in owners),
        "time": time.monotonic(),
    }


def shard_holders(database_url: str) -> str:
    """Who holds which lease now (with shards: which owner serves which shard)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as db:
        rows = db.execute(
            "SELECT name, holder FROM rates_ownerlease WHERE expires_at > now()"
            " AND name NOT LIKE 'live-rates/seen/%' ORDER BY name"
        ).fetchall()
    return ", ".join(f"{name} <- {holder.split(':')[0]}" for name, holder in rows)


def delivered(
    ticks: list[tuple[str, int, float]],
    seen: list[tuple[str, int, float]],
    window: tuple[float, float],
) -> tuple[float, list[float]]:
    """The share of the bare client's ticks (away from the window's edges) that reached the
    socket, and each one's tick -> socket latency (ms)."""
    arrived = {(pair, at): arrival for pair, at, arrival in seen}
    start, end = window
    expected = [(p, at) for p, at, _ in ticks if start + EDGE <= at / 1000 <= end - EDGE]
    latencies = [(arrived[key] - key[1] / 1000) * 1000 for key in expected if key in arrived]
    return (len(latencies) / len(expected) if expected else float("nan")), latencies


async def one_run(
    args: argparse.Namespace, pairs: int, nats_port: int, workdir: Path, profile: Path | None
) -> dict[str, float]:
    emulator_port, web_port = free_port(), free_port()
    metrics_ports = [free_port() for _ in range(args.owners)]
    env = stack_env(args, nats_port, emulator_port)
    await asyncio.to_thread(empty_database, args.database_url, pairs, env)
    processes = Processes()
    emulator = f"http://127.0.0.1:{emulator_port}"
    web = f"http://127.0.0.1:{web_port}"
    tasks: list[asyncio.Task[None]] = []
    try:
        emulator_process = processes.start(
            [PYTHON, "manage.py", "run_emulator", "--port", str(emulator_port),
             "--synthetic-pairs", str(pairs), "--walk-slices", str(args.walk_slices)],
            env, workdir / f"emulator-{pairs}.log",
        )  # fmt: skip
        await asyncio.to_thread(wait_for_port, emulator_port, 60.0)
        owners = [
            processes.start(
                [PYTHON, "manage.py", "run_fetch", "--watch"],
                {**env, "KURS_METRICS_PORT": str(port), "KURS_INSTANCE": f"owner{index}"},
                workdir / f"owner{index}-{pairs}.log",
            )
            for index, port in enumerate(metrics_ports)
        ]
        owner = owners[0]
        web_process = processes.start(serve_cmd(web_port), env, workdir / f"web-{pairs}.log")
        await asyncio.to_thread(wait_for_port, web_port, 60.0)
        for port in metrics_ports:
            await asyncio.to_thread(wait_for_port, port, 60.0)
        rated = await settle(web, pairs)
        if args.owners > 1 or args.shards > 1:
            holding = await asyncio.to_thread(shard_holders, args.database_url)
            print(f"  {pairs} pairs, leases: {holding}", flush=True)

        bare = BareBinance(emulator_port, pairs)
        tasks.append(asyncio.create_task(bare.run()))
        every = Sockets(web_port)
        await every.open(["/ws/items"])
        await asyncio.sleep(EDGE)  # the bare client's subscriptions, the socket's snapshot

        profiler = None if profile is None else py_spy(owner.pid, args.window, profile)
        metrics_urls = [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports]
        measured = [(url, process.pid) for url, process in zip(metrics_urls, owners, strict=True)]
        bare.recording = every.recording = True
        bare_before = bare.frames
        before = await asyncio.to_thread(counters, emulator, measured)
        cpu_before = await asyncio.to_thread(cpu_times)
        started = time.time()
        await asyncio.sleep(args.window)
        after = await asyncio.to_thread(counters, emulator, measured)
        cpu_after = await asyncio.to_thread(cpu_times)
        ended = time.time()
        bare.recording = False
        bare_frames = bare.frames - bare_before
        await asyncio.sleep(GRACE)  # the last ticks of the window reach the socket
        every.recording = False
        if profiler is not None:
            profiler.wait(args.window + 60)
        seconds = after["time"] - before["time"]
        share, latencies = delivered(bare.ticks, every.arrivals, (started, ended))
        bare_latencies = [
            (arrival - at / 1000) * 1000
            for _, at, arrival in bare.ticks
            if started + EDGE <= at / 1000 <= ended - EDGE
        ]
        owner_frames = (
            after["binance_frames"] - before["binance_frames"] - bare_frames
            + after["bybit_frames"] - before["bybit_frames"]
        )  # fmt: skip
        every.close()
        result = {
            # Binance and Bybit list every pair, each moving once a second.
            "ticks_due": 2.0 * pairs,
            "rated": 100 * rated / pairs,
            "ticks_to_owner": owner_frames / seconds,
            "accepted": (after["accepted"] - before["accepted"]) / seconds,
            "rejected": (after["rejected"] - before["rejected"]) / seconds,
            "published": (after["published"] - before["published"]) / seconds,
            "owner_cpu": 100 * (after["cpu"] - before["cpu"]) / seconds,
            "delivered": 100 * share,
            "latency_median": statistics.median(latencies) if latencies else float("nan"),
            "latency_p99": percentile(latencies, 99) if latencies else float("nan"),
            # Every rate event on the socket during the window: arrival minus its source_time
            # (a REST round's quote carries its receipt time): how far behind the owner runs.
            "age_p99": (
                percentile([(a - at / 1000) * 1000 for _, at, a in every.arrivals], 99)
                if every.arrivals
                else float("nan")  # an owner so far behind that nothing arrived in the window
            ),
            "bare_median": statistics.median(bare_latencies),
            "bare_p99": percentile(bare_latencies, 99),
        }
        parts = {
            "emulator": [emulator_process.pid],
            "owner": [process.pid for process in owners],
            "web": [web_process.pid],
        }
        result.update(cpu_by_part(cpu_before, cpu_after, parts, seconds))
        result.update(await asyncio.to_thread(web_figures, args, web, web_port))
        for sockets in args.fanout:
            result.update(await fanout(args, web_port, pairs, sockets, metrics_urls))
        return result
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        processes.stop_all()


def web_figures(args: argparse.Namespace, web: str, web_port: int) -> dict[str, float]:
    body = get_bytes(web + COURSES)
    wrk(web + COURSES, 1.0, 16)  # every worker's first requests
    rates = [wrk(web + COURSES, args.wrk_duration, 64)[0] for _ in range(2)]
    workers = [pid for pid, role in web_processes(web_port).items() if role == "worker"]
    rss = rss_kib(workers)
    return {
        "courses_rps": statistics.median(rates),
        "courses_bytes": float(len(body)),
        "worker_rss_mib": statistics.mean(rss.values()) / 1024 if rss else float("nan"),
    }


async def fanout(
    args: argparse.Namespace, web_port: int, pairs: int, sockets: int, metrics_urls: list[str]
) -> dict[str, float]:
    """`sockets` clients of one pair each (round robin): deliveries/s, their share of what was
    published for those pairs, and tick -> socket p99 of every 10th client."""
    group = Sockets(web_port)
    paths = [f"/ws/items?pairs=SYN{i % pairs + 1:04d}-USDT" for i in range(sockets)]
    try:
        await asyncio.wait_for(group.open(paths, timed_every=10), SETTLE_TIMEOUT)
    except (TimeoutError, OSError, RuntimeError) as exc:
        group.close()
        print(f"  fan-out {sockets} sockets at {pairs} pairs: could not open them all ({exc!r})")
        return {f"fanout{sockets}_rps": nan, f"fanout{sockets}_p99": nan}
    await asyncio.sleep(EDGE)
    before = await asyncio.to_thread(rate_events, metrics_urls)
    group.recording, started = True, time.monotonic()
    await asyncio.sleep(args.window)
    published = await asyncio.to_thread(rate_events, metrics_urls) - before
    group.recording, seconds = False, time.monotonic() - started
    group.close()
    # Every pair moves alike: each gets its share of the events, for each of its followers.
    expected = published / pairs * sockets
    latencies = [(arrival - at / 1000) * 1000 for _, at, arrival in group.arrivals]
    return {
        f"fanout{sockets}_rps": group.rate_frames / seconds,
        f"fanout{sockets}_share": 100 * group.rate_frames / expected if expected else nan,
        f"fanout{sockets}_p99": percentile(latencies, 99) if latencies else float("nan"),
    }


# --- the report -------------------------------------------------------------------------------
FIGURES = (
    ("rated", "pairs with a rate before the window, %", "{:.1f}", "100"),
    ("ticks_due", "ticks due to the owner /s", "{:,.0f}", ""),
    ("ticks_to_owner", "ticks sent to the owner /s", "{:,.0f}", ""),
    ("accepted", "quotes accepted /s", "{:,.0f}", ""),
    ("rejected", "quotes rejected /s", "{:,.1f}", ""),
    ("published", "rate events published /s", "{:,.0f}", ""),
    ("owner_cpu", "owner CPU, % of one core", "{:,.0f}", ""),
    ("delivered", "Binance ticks on the socket, %", "{:.1f}", "100"),
    ("latency_median", "tick -> socket median, ms", "{:,.0f}", ""),
    ("latency_p99", "tick -> socket p99, ms", "{:,.0f}", "< 250"),
    ("age_p99", "every event on the socket: age p99, ms", "{:,.0f}", ""),
    ("bare_median", "tick -> bare client median, ms", "{:,.0f}", ""),
    ("bare_p99", "tick -> bare client p99, ms", "{:,.0f}", ""),
    ("cpu_emulator", "CPU in the window, % of a core: the emulator", "{:,.0f}", ""),
    ("cpu_owner", "  the owner(s)", "{:,.0f}", ""),
    ("cpu_web", "  the web server (2 workers)", "{:,.0f}", ""),
    ("cpu_nats-server", "  nats-server (the machine's too)", "{:,.0f}", ""),
    ("cpu_postgres", "  PostgreSQL (every backend)", "{:,.0f}", ""),
    ("cpu_bench", "  this bench (its clients)", "{:,.0f}", ""),
    ("cpu_other", "  everything else", "{:,.0f}", ""),
    ("cpu_total", "  all (the machine has 2 cores: 200)", "{:,.0f}", ""),
    ("courses_rps", "/courses (every pair) req/s", "{:,.0f}", ">= 5,000"),
    ("courses_bytes", "/courses body, bytes", "{:,.0f}", ""),
    ("worker_rss_mib", "web worker RSS, MiB", "{:,.1f}", ""),
)


def report(results: dict[int, list[dict[str, float]]], args: argparse.Namespace) -> None:
    scales = sorted(results)
    base = scales[0]
    medians = {
        n: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for n, runs in results.items()
    }
    figures = list(FIGURES)
    for sockets in args.fanout:
        figures += [
            (f"fanout{sockets}_rps", f"fan-out {sockets} sockets: deliveries/s", "{:,.0f}", ""),
            (f"fanout{sockets}_share", f"fan-out {sockets}: delivered of published, %",
             "{:.1f}", "100"),
            (f"fanout{sockets}_p99", f"fan-out {sockets}: tick -> socket p99, ms", "{:,.0f}", ""),
        ]  # fmt: skip
    print(
        f"{args.repeats} run(s) per scale, medians; {args.window:g} s windows; web: uvicorn "
        f"{WEB_WORKERS} workers (scripts/serve.sh); owner: run_fetch --watch (Binance + Bybit)"
        f" x {args.owners}, KURS_OWNER_SHARDS={args.shards}; emulator moves in "
        f"{args.walk_slices} slice(s) a second; PostgreSQL; "
        f"ratio = figure / the {base}-pair figure of the same bench"
    )
    head = f"{'figure':<44}" + "".join(f"{f'{n} pairs':>22}" for n in scales) + "   target"
    print(head)
    for key, label, form, target in figures:
        if key not in medians[base]:
            continue
        cells = []
        for n in scales:
            value = medians[n].get(key, float("nan"))
            cell = form.format(value)
            if n != base:
                base_value = medians[base].get(key, float("nan"))
                ratio = value / base_value if base_value else float("nan")
                cell += f" ({ratio:.2f}x)"
            cells.append(f"{cell:>22}")
        print(f"{label:<44}" + "".join(cells) + (f"   {target}" if target else ""))
    if "worker_rss_mib" in medians[base]:
        deltas = ", ".join(
            f"{n} pairs {medians[n]['worker_rss_mib'] - medians[base]['worker_rss_mib']:+.1f} MiB"
            for n in scales[1:]
        )
        print(f"snapshot memory per web worker (RSS over the {base}-pair run's): {deltas}")


def frame_name(frame: str) -> str:
    """``Class.function (/path/to/module.py:12)`` -> ``Class.function (module.py:12)``."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit('/', 1)[-1]}"


def summarise_profile(path: Path, top: int = 16) -> None:
    """Per thread of the owner, the share of wall-clock samples (py-spy --idle) in each function
    (inclusive) and where they ended (self): threads idle in their event loop are left out."""
    if not path.exists():
        print(f"profile: {path} was not written (py-spy needs ptrace rights)")
        return
    inclusive: dict[str, Counter[str]] = {}
    leaf: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        names = [frame_name(frame) for frame in frames]
        if names:
            leaf.setdefault(thread, Counter())[names[-1]] += int(count)
        names = [name for name in names if "(threading.py" not in name and "(sync.py" not in name]
        for name in set(names):
            inclusive.setdefault(thread, Counter())[name] += int(count)
    largest = max((sum(counts.values()) for counts in leaf.values()), default=0)
    print(f"profile of the owner ({path}), wall-clock share per thread:")
    for thread, counts in inclusive.items():
        total = sum(leaf.get(thread, Counter()).values())
        idle = sum(c for n, c in leaf.get(thread, Counter()).items() if n.startswith(IDLE))
        if not total or idle / total > 0.9 or total < largest / 2:
            continue  # idle, or a short-lived thread (a metrics scrape)
        print(f"  {thread}: {100 * (1 - idle / total):.0f}% busy")
        for name, samples in counts.most_common(top):
            print(f"    {100 * samples / total:5.1f}%  {name}")
        print("    where it was (self):")
        for name, samples in leaf[thread].most_common(6):
            print(f"    {100 * samples / total:5.1f}%  {name}")


async def main_async(args: argparse.Namespace, workdir: Path) -> None:
    await asyncio.to_thread(migrate, args)
    nats, nats_port = start_nats(workdir)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.pairs}
    try:
        await asyncio.to_thread(wait_for_port, nats_port, 10.0)
        for repeat in range(args.repeats):
            for pairs in args.pairs:
                profile = None
                if args.profile is not None and pairs == max(args.pairs):
                    profile = args.profile / f"owner-{pairs}-run{repeat + 1}.txt"
                run = await one_run(args, pairs, nats_port, workdir, profile)
                results[pairs].append(run)
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in run.items())
                print(f"run {repeat + 1}, {pairs} pairs: {shown}", flush=True)
                if profile is not None:
                    summarise_profile(profile)
    finally:
        nats.terminate()
        nats.wait(10)
    report(results, args)


def numbers(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",") if part.strip()]


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kurs-bench-scale-") as name:
        yield Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=numbers, default=[8, 100, 1000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per run")
    parser.add_argument("--wrk-duration", type=float, default=4.0)
    parser.add_argument("--fanout", type=numbers, default=[1000, 5000], help="'' for none")
    parser.add_argument("--database-url", default=DATABASE_URL)
    parser.add_argument("--profile", type=Path, default=None, help="folder for py-spy's stacks")
    parser.add_argument("--owners", type=int, default=1, help="owner processes (run_fetch)")
    parser.add_argument("--shards", type=int, default=1, help="KURS_OWNER_SHARDS")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the logs here")
    parser.add_argument(
        "--walk-slices",
        type=int,
        default=10,
        help="the emulator spreads each second's moves over this many slices (1: all at once)",
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    before, started = cpu_times(), time.monotonic()
    with workspace() as workdir:
        try:
            asyncio.run(main_async(args, workdir))
        finally:
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    (args.keep_logs / log.name).write_bytes(log.read_bytes())
    print(neighbours(before, time.monotonic() - started))


if __name__ == "__main__":
    main()
