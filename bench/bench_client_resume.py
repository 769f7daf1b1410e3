"""The Python client's resume over forced disconnects: versions expected (from the database)
against versions received, duplicates and out-of-order, real processes.

    .venv/bin/python bench/bench_client_resume.py [--disconnects 20] [--poll 1]

A fetcher and a uvicorn web process run against the exchange emulator (prices moving every
0.5 s), a SQLite file, a nats-server with JetStream and a redis-server of this run's own. Three
streams follow BTC-USD and ETH-USD through `--disconnects` forced disconnects, taken in turn
from: the web process killed (SIGKILL) and restarted on its port, the web process stopped
(SIGTERM: sockets closed with 1012) and restarted, and NATS killed and restarted. The streams:
`kurs_client` over the WebSocket, `kurs_client` over SSE, and the in-run baseline, a plain
WebSocket client that reconnects without `since` and keeps what it is sent (what a hand-written
client does). At the end, each pair's versions received are compared with every version the
database published after the first snapshot. Versions published while NATS was down travel
over the Redis fallback, unnumbered and at most once: those in flight at the instant NATS died
cannot be replayed by anyone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from kurs_client import AsyncClient  # noqa: E402

from rates.emulator import run_emulator_server  # noqa: E402
from tests.clientrun import (  # noqa: E402
    NaiveSocket,
    Recorder,
    caught_up,
    database_versions,
    first_versions,
    recording,
    restart_web,
    versions_report,
)
from tests.services import NatsServer, RedisServer, free_port  # noqa: E402
from tests.stack import Stack, wait_until  # noqa: E402

PAIRS = ("BTC-USD", "ETH-USD")
KINDS = ("web SIGKILL", "web SIGTERM", "NATS SIGKILL")


async def run(disconnects: int, poll: float) -> None:
    folder = Path(tempfile.mkdtemp(prefix="kurs-bench-client-"))
    nats_server = NatsServer(port=free_port(), store_dir=folder / "jetstream")
    redis = RedisServer(port=free_port())
    nats_server.start()
    redis.start()
    try:
        async with run_emulator_server(host="127.0.0.1", port=0, tick=0.5, seed=5) as emulator:
            stack = Stack(
                folder=folder,
                emulator=emulator,
                poll=poll,
                nats_url=nats_server.url,
                redis_url=redis.url,
            )
            await asyncio.to_thread(stack.migrate, active=PAIRS)
            stack.fetcher()
            web = await asyncio.to_thread(stack.web)
            try:
                await wait_until(
                    lambda: len(stack.query("SELECT 1 FROM rates_currentrate")) == len(PAIRS),
                    within=60,
                    what="current rates",
                )
                url = f"http://127.0.0.1:{web.port}"
                naive = NaiveSocket(f"ws://127.0.0.1:{web.port}/ws/items?pairs={','.join(PAIRS)}")
                naive_task = asyncio.create_task(naive.run())
                socket = AsyncClient(url).stream(list(PAIRS))
                sse = AsyncClient(url).stream(list(PAIRS), transport="sse")
                # Seconds the server was away (stop and start), then until the next event.
                down: dict[str, list[float]] = {kind: [] for kind in KINDS}
                back: dict[str, list[float]] = {kind: [] for kind in KINDS}
                async with recording(socket) as by_socket, recording(sse) as by_sse:
                    await wait_until(lambda: bool(naive.versions), within=30, what="baseline")
                    first = {"ws": first_versions(by_socket), "sse": first_versions(by_sse)}
                    naive_first = {p: v[0] for p, v in naive.versions.items()}
                    for n in range(disconnects):
                        kind = KINDS[n % len(KINDS)]
                        await asyncio.gather(by_socket.until_more(2), by_sse.until_more(2))
                        started = time.monotonic()
                        if kind == "NATS SIGKILL":
                            await asyncio.to_thread(nats_server.kill)
                            await asyncio.to_thread(nats_server.start)
                        else:
                            web = await asyncio.to_thread(
                                restart_web, stack, web, kill=kind == "web SIGKILL"
                            )
                        restarted = time.monotonic()
                        await asyncio.gather(by_socket.until_more(1), by_sse.until_more(1))
                        back[kind].append(time.monotonic() - restarted)
                        down[kind].append(restarted - started)
                        print(
                            f"  {n + 1:2}/{disconnects} {kind:13} next event after"
                            f" {back[kind][-1]:.2f} s of the restart ({down[kind][-1]:.2f} s away)",
                            flush=True,
                        )
                    target = database_versions(stack, PAIRS)
                    for recorder in (by_socket, by_sse):
                        await wait_until(
                            caught_up(recorder, target),
                            within=60,
                            what="caught up",
                        )
                    current = database_versions(stack, PAIRS)
                naive_task.cancel()
                await asyncio.gather(naive_task, return_exceptions=True)
                report(
                    disconnects,
                    current,
                    {
                        "kurs_client ws": (by_socket, first["ws"]),
                        "kurs_client sse": (by_sse, first["sse"]),
                    },
                    naive.versions,
                    naive_first,
                    down,
                    back,
                    {"kurs_client ws": socket.dropped, "kurs_client sse": sse.dropped},
                )
            finally:
                await asyncio.to_thread(stack.stop)
    finally:
        nats_server.kill()
        redis.kill()


def report(
    disconnects: int,
    current: dict[str, int],
    clients: dict[str, tuple[Recorder, dict[str, int]]],
    naive: dict[str, list[int]],
    naive_first: dict[str, int],
    down: dict[str, list[float]],
    back: dict[str, list[float]],
    dropped: dict[str, int],
) -> None:
    rows = {name: (r.versions, f) for name, (r, f) in clients.items()}
    rows["baseline (no since)"] = (naive, naive_first)
    print()
    print(
        f"{disconnects} forced disconnects ({', '.join(KINDS)} in turn); BTC-USD and ETH-USD;"
        " shared 2-core machine"
    )
    print(
        f"{'client':20} {'expected':>8} {'received':>8} {'missing':>7} {'dup':>4} {'order':>5}"
        f" {'dropped':>7} {'received/baseline':>17}"
    )
    baseline = 0
    results = []
    for name, (versions, first) in rows.items():
        totals = [0, 0, 0, 0, 0]
        for pair in PAIRS:
            r = versions_report(versions.get(pair, []), first[pair], current[pair])
            for i, figure in enumerate(
                (r.expected, r.received, len(r.missing), r.duplicates, r.out_of_order)
            ):
                totals[i] += figure
        results.append((name, totals))
        if name.startswith("baseline"):
            baseline = totals[1] * 10_000 // max(totals[0], 1)
    for name, totals in results:
        share = totals[1] * 10_000 // max(totals[0], 1)
        ratio = f"{share / max(baseline, 1):.2f}x"
        print(
            f"{name:20} {totals[0]:8} {totals[1]:8} {totals[2]:7} {totals[3]:4} {totals[4]:5}"
            f" {dropped.get(name, 0):7} {ratio:>17}"
        )
    print()
    print("seconds the server was away (stop and start), then from its restart to the next event")
    print("on both kurs_client streams (reconnection with back-off, resume): median and max")
    for kind, seconds in back.items():
        if seconds:
            away = down[kind]
            print(
                f"  {kind:13} away {statistics.median(away):6.2f} {max(away):6.2f}"
                f"   next event {statistics.median(seconds):6.2f} {max(seconds):6.2f}"
                f"  ({len(seconds)} times)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disconnects", type=int, default=20)
    parser.add_argument("--poll", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(run(args.disconnects, args.poll))


if __name__ == "__main__":
    main()
