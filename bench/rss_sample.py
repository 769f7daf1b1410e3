"""Resident memory of the web server's processes, sampled every second (for `make loadtest`).

    .venv/bin/python bench/rss_sample.py [--port 8000] [--seconds 60] [--out rss.csv]

The web processes are found by the listening socket, not by name (other sessions run uvicorn
too): every process holding the socket that listens on 127.0.0.1:<port>. Under uvicorn
`--workers N` that is the supervisor and its N workers (the workers' parent is the supervisor);
a single-process server is one `web` process. RSS is `ps -o rss` (KiB), as `top` shows it.

The sampler also reads every process's CPU time at each tick, so `bench/loadtest.py` can say
what shared the cores during the run, processes that ended meanwhile included.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TCP_LISTEN = "0A"


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (IPv4 or IPv6, any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def web_processes(port: int) -> dict[int, str]:
    """{pid: role} of the processes serving `port`: `supervisor` and `worker`s, or one `web`."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = {os.readlink(fd) for fd in fd_dir.iterdir()}
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if links & wanted:
            holders.add(int(fd_dir.parent.name))
    if len(holders) == 1:
        return {holders.pop(): "web"}
    roles = {}
    for pid in holders:
        try:
            roles[pid] = "worker" if parent_pid(pid) in holders else "supervisor"
        except OSError:
            continue
    return roles


def rss_kib(pids: list[int]) -> dict[int, int]:
    """{pid: resident set size in KiB} from `ps -o rss`; processes that ended are left out."""
    if not pids:
        return {}
    result = subprocess.run(
        ["ps", "-o", "pid=,rss=", "-p", ",".join(map(str, pids))],
        capture_output=True,
        text=True,
        check=False,  # ps exits 1 when one of the pids has gone
    )
    sizes = {}
    for line in result.stdout.splitlines():
        pid, rss = line.split()
        sizes[int(pid)] = int(rss)
    return sizes


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process: {pid: (command line, seconds)}."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        name = " ".join(arg.decode(errors="replace") for arg in argv if arg)
        name = name or stat[stat.index("(") + 1 : stat.rindex(")")]
        times[int(proc.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return times


@dataclass
class Sampler:
    """Samples the web processes' RSS and every process's CPU time once a second, in a thread."""

    port: int
    interval: float = 1.0
    started: float = 0.0
    roles: dict[int, str] = field(default_factory=dict)
    # (seconds since start, pid, role, rss KiB)
    rows: list[tuple[float, int, str, int]] = field(default_factory=list)
    cpu_first: dict[int, tuple[str, float]] = field(default_factory=dict)
    cpu_last: dict[int, tuple[str, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.roles = web_processes(self.port)
        if not self.roles:
            raise RuntimeError(f"no process listens on port {self.port}")
        self.started = time.monotonic()
        self.cpu_first = cpu_seconds()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        now = time.monotonic() - self.started
        for pid, rss in sorted(rss_kib(list(self.roles)).items()):
            self.rows.append((round(now, 3), pid, self.roles[pid], rss))
        for pid, entry in cpu_seconds().items():
            self.cpu_last[pid] = entry
            # A process that started during the run used all its CPU time within it.
            self.cpu_first.setdefault(pid, (entry[0], 0.0))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def peaks(self) -> dict[int, tuple[str, int, int]]:
        """{pid: (role, first RSS KiB, peak RSS KiB)}."""
        peaks: dict[int, tuple[str, int, int]] = {}
        for _, pid, role, rss in self.rows:
            first = peaks[pid][1] if pid in peaks else rss
            peak = max(peaks[pid][2], rss) if pid in peaks else rss
            peaks[pid] = (role, first, peak)
        return peaks

    def cpu_used(self) -> dict[int, tuple[str, float]]:
        """CPU seconds each process used between start and the last sample."""
        return {
            pid: (name, total - self.cpu_first.get(pid, (name, 0.0))[1])
            for pid, (name, total) in self.cpu_last.items()
        }

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(["seconds", "pid", "role", "rss_kib"])
            writer.writerows(self.rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("KURS_PORT", "8000")))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="CSV of every sample")
    args = parser.parse_args()
    sampler = Sampler(args.port)
    try:
        sampler.start()
    except RuntimeError as error:
        print(f"rss_sample: {error}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the sampling early
        time.sleep(args.seconds)
    sampler.stop()
    if args.out:
        sampler.write_csv(args.out)
    for pid, (role, first, peak) in sorted(sampler.peaks().items()):
        print(f"{role:10} pid {pid}: {first / 1024:.1f} MiB at start, peak {peak / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
