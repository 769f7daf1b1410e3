"""Replay cost (issue 17): the web process's CPU for 30 concurrent resumes of the SSE stream.

A nats-server with JetStream of its own, one uvicorn web process (as `tests/stack.py` starts
it: SQLite, no fetcher), and 8,700 `rate.updated` events published into the stream (the size of
the stream the issue measured), then a marker event. Each round starts the web process anew
with its settings and sends 30 concurrent `GET /api/v1/stream` resumes; a client is done when
the marker arrives (a replay), after the `snapshot` that follows a `gap`, or on a 429. The
figure is the web process's CPU time (utime + stime from /proc) over the round, beside its wall
time and the answers:

1. bounds off (KURS_MAX_REPLAY_EVENTS=1000000, KURS_MAX_REPLAYS_PER_CLIENT=1000): as before
   issue 17, 30 full replays of `?since=1`;
2. the defaults, 30 x `?since=1` from one address: each gets `gap` + snapshot;
3. the defaults, 30 resumes 1,000 events behind (the largest replay served) from one address:
   KURS_MAX_REPLAYS_PER_CLIENT (2) replay, the others are refused while those run;
4. the defaults, the same from 30 addresses (KURS_NUM_PROXIES=1 and X-Forwarded-For, as behind
   a proxy): 30 replays of 1,000 events, the most 30 clients can make a process read at once.

    .venv/bin/python bench/bench_replay.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import nats.js.errors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from realtime.nats import stream_name  # noqa: E402
from tests.services import NatsServer, free_port  # noqa: E402
from tests.stack import Stack  # noqa: E402

EVENTS = 8_700
CLIENTS = 30
PAIRS = ("BTC-USD", "ETH-USD", "BTC-RUB", "ETH-RUB")
MARKER = "bench-replay-end"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BOUNDS_OFF = {"KURS_MAX_REPLAY_EVENTS": "1000000", "KURS_MAX_REPLAYS_PER_CLIENT": "1000"}


@dataclass
class NoEmulator:
    """The web process fetches nothing: what `Stack.env` needs of an emulator, unreachable."""

    def rest_url(self, name: str) -> str:
        return f"http://127.0.0.1:1/{name}"

    def ws_url(self, name: str) -> str:
        return f"ws://127.0.0.1:1/{name}"


@dataclass
class ReplayStack(Stack):
    settings: dict[str, str] = field(default_factory=dict)

    def env(self, instance: str) -> dict[str, str]:
        return {**super().env(instance), "KURS_LOG_LEVEL": "WARNING", **self.settings}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def envelope(event_type: str, data: dict[str, object]) -> bytes:
    message = {"type": event_type, "data": data, "ts": "2026-12-06T00:00:00Z"}
    return json.dumps({**message, "id": str(uuid.uuid4())}).encode()


async def fill(url: str, prefix: str) -> int:
    """EVENTS rate updates round-robin over PAIRS, then the marker: the marker's sequence."""
    bus = await nats.connect(url)
    js = bus.jetstream()
    # The web process makes the stream once connected: wait for it, or the publishes go nowhere.
    async with asyncio.timeout(30):
        while True:
            try:
                await js.stream_info(stream_name(prefix))
                break
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
    headers = {"Kurs-Origin": "bench"}
    for start in range(0, EVENTS, 500):
        acks = []
        for n in range(start, min(start + 500, EVENTS)):
            pair = PAIRS[n % len(PAIRS)]
            data = {
                "direction": pair,
                "value": 50_000 + n / 100,
                "provider": "binance",
                "source_time": "2026-12-06T00:00:00Z",
                "checked_at": "2026-12-06T00:00:00Z",
                "status": "live",
                "derived": False,
                "route": None,
                "version": n + 1,
            }
            subject = f"{prefix}.rates.{pair}"
            acks.append(js.publish(subject, envelope("rate.updated", data), headers=headers))
        await asyncio.gather(*acks)
    marker: dict[str, object] = {"name": MARKER, "state": "closed", "reason": ""}
    ack = await js.publish(
        f"{prefix}.provider.state", envelope("provider.state", marker), headers=headers
    )
    await bus.close()
    return ack.seq


async def resume(base: str, since: int, address: str | None) -> str:
    """One client's resume, read to its end: `replay`, `gap` or the refusal's status."""
    headers = {"X-Forwarded-For": address} if address else {}
    async with (
        httpx.AsyncClient(base_url=base, timeout=120.0) as http,
        http.stream("GET", f"/api/v1/stream?since={since}", headers=headers) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            return str(response.status_code)
        gap = False
        async for line in response.aiter_lines():
            if line == "event: gap":
                gap = True
            elif gap and line == "event: snapshot":
                return "gap"
            elif line.startswith("data:") and MARKER in line:
                return "replay"
    return "ended"


async def round_of(
    stack: ReplayStack, name: str, settings: dict[str, str], since: int, *, addresses: bool
) -> None:
    stack.settings = settings
    web = await asyncio.to_thread(stack.web, f"web-{len(stack.processes)}")
    base = f"http://127.0.0.1:{web.port}"
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/api/v1/health")).status_code in (200, 503)
    pid = web.popen.pid
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    answers = await asyncio.gather(
        *(resume(base, since, f"10.1.0.{n}" if addresses else None) for n in range(CLIENTS))
    )
    cpu, wall = cpu_seconds(pid) - cpu_before, time.perf_counter() - started
    await asyncio.to_thread(web.stop)
    counts = ", ".join(f"{count} {answer}" for answer, count in sorted(Counter(answers).items()))
    print(f"{name}: web CPU {cpu:.2f} s in {wall:.2f} s wall; answers: {counts}", flush=True)


async def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="kurs-bench-replay-"))
    server = NatsServer(port=free_port(), store_dir=folder / "jetstream")
    server.start()
    # No emulator: the stand-in has the one method the stack calls.
    stack = ReplayStack(folder=folder, emulator=NoEmulator(), nats_url=server.url)  # type: ignore[arg-type]
    try:
        await asyncio.to_thread(stack.migrate, active=PAIRS)
        # The first web process makes the stream; the events outlive it (24 h max age).
        stack.settings = BOUNDS_OFF
        first = await asyncio.to_thread(stack.web, "web-fill")
        last = await fill(server.url, stack.prefix)
        await asyncio.to_thread(first.stop)
        print(f"stream: {last} events; {CLIENTS} concurrent clients per round", flush=True)
        one_behind = last - 1000
        await round_of(stack, "1. bounds off, since=1", BOUNDS_OFF, 1, addresses=False)
        await round_of(stack, "2. defaults, since=1", {}, 1, addresses=False)
        await round_of(
            stack, "3. defaults, 1,000 behind, one address", {}, one_behind, addresses=False
        )
        await round_of(
            stack,
            "4. defaults, 1,000 behind, 30 addresses",
            {"KURS_NUM_PROXIES": "1"},
            one_behind,
            addresses=True,
        )
    finally:
        await asyncio.to_thread(stack.stop)
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
