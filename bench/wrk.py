"""The wrk runner the HTTP benches share (`bench_courses.py`, `bench_nginx_cache.py`,
`bench_udf.py`, `bench_scale.py`): one wrk run read into figures, the run around a bench (its
tools checked, a temporary folder and a nats-server of its own), and the line that says what
else used the machine's cores meanwhile.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.services import NatsServer, free_port  # noqa: E402

# --- load ------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(
    url: str, duration: float, connections: int, header: str | None = None
) -> tuple[float, float, int]:
    """One wrk run: (requests/s, p99 latency in ms, requests). Non-2xx/3xx answers fail the
    bench."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    if header:
        cmd[1:1] = ["-H", header]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 30)
    text = out.stdout
    if "Non-2xx or 3xx responses" in text:
        raise SystemExit(f"bench: errors from {url}:\n{text}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", text)
    count = re.search(r"(\d+) requests in", text)
    if rps is None or p99 is None or count is None:
        raise SystemExit(f"bench: no rate or 99th percentile in wrk's output for {url}:\n{text}")
    value, unit = p99.groups()
    return float(rps.group(1)), float(value) * _UNITS[unit], int(count.group(1))


# --- the run around a bench ------------------------------------------------------------------
@contextmanager
def bench_run(prefix: str, tools: Iterable[str] = ()) -> Iterator[tuple[Path, int]]:
    """A temporary folder and the port of a plain nats-server of the bench's own (the machine's
    NATS keeps no stream or subject of the run), once `tools` are found; afterwards, what
    shared the cores (`neighbours`) is printed."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: `{tool}` is missing: apt-get install {tool}")
    before = cpu_times()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        nats = NatsServer(port=free_port())
        nats.start()
        try:
            yield Path(name), nats.port
        finally:
            nats.stop()
    print(neighbours(before, time.monotonic() - started))


# --- what shared the cores -------------------------------------------------------------------
def cpu_times() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process: {pid: (name, seconds)}."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        times[int(stat.parent.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return times


def neighbours(before: dict[int, tuple[str, float]], seconds: float) -> str:
    """The load average and what other processes used meanwhile.

    Ours (servers, wrk) have ended by now; processes that came and went within the run are not
    seen, which the load average still reflects.
    """
    after = cpu_times()
    used: dict[str, float] = {}
    for pid, (name, total) in after.items():
        if pid != os.getpid():
            used[name] = used.get(name, 0.0) + total - before.get(pid, (name, 0.0))[1]
    busy = sorted(((t, n) for n, t in used.items() if t >= 1.0), reverse=True)[:6]
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    listed = ", ".join(f"{name} {t:.0f} s" for t, name in busy) or "nothing over 1 s"
    return (
        f"shared the {os.cpu_count()} cores over {seconds:.0f} s: load average {load}; "
        f"CPU used by other processes: {listed}"
    )
