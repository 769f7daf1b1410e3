"""`make loadtest`: bench/locustfile.py headless against a running `make run`, then its report.

    .venv/bin/python bench/loadtest.py [--port 8000] [--users 200] [--seconds 60] [--out DIR]

1. checks that Kurs answers on http://<host>:<port> (else: start `make run` first);
2. runs locust headless (`--csv-full-history`, `--html`) while bench/rss_sample.py samples the
   RSS of every web process and every process's CPU time each second;
3. writes into --out: locust's CSVs and HTML report, `rss.csv`, the charts `throughput.png`
   (requests/s and failures/s over time), `latency.png` (p50/p95/p99 over time) and `rss.png`,
   and `summary.md` (per endpoint and total: requests/s, failures, p50/p95/p99; peak RSS per web
   process; what shared the cores), also printed.

It exits with locust's code (1 when any request failed), after the report is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display here
import matplotlib.pyplot as plt

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from rss_sample import Sampler  # noqa: E402

PREFIX = "locust"
HTTP_METHODS = ("GET", "POST")
MIB = 1024.0


# --- running -----------------------------------------------------------------------------------
def service_error(origin: str) -> str | None:
    """Why Kurs does not answer at `origin`, or None when it does (any HTTP status counts)."""
    try:
        with urllib.request.urlopen(f"{origin}/api/v1/health", timeout=5) as response:
            response.read()
    except urllib.error.HTTPError:
        return None  # it answered (a `down` health is a 503): the load test shows the rest
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"nothing answers on {origin} ({reason})"
    return None


def run_locust(args: argparse.Namespace, origin: str, out: Path) -> tuple[int, int]:
    """Run locust headless; returns (exit code, its pid)."""
    command = [
        str(Path(sys.executable).parent / "locust"),
        "-f",
        str(BENCH / "locustfile.py"),
        "--headless",
        "--host",
        origin,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.seconds}s",
        "--stop-timeout",
        "5",
        "--csv",
        str(out / PREFIX),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--only-summary",
    ]
    env = {**os.environ, "LOADTEST_WS_CLIENTS": str(args.ws_clients)}
    process = subprocess.Popen(command, env=env)
    return process.wait(), process.pid


# --- reading locust's files --------------------------------------------------------------------
@dataclass
class Row:
    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None
    max_ms: float | None


def _number(text: str) -> float | None:
    return None if text in ("", "N/A") else float(text)


def read_stats(out: Path) -> list[Row]:
    rows = []
    with (out / f"{PREFIX}_stats.csv").open(encoding="utf-8") as handle:
        for line in csv.DictReader(handle):
            if line["Name"] == "Aggregated":
                continue
            timed = int(line["Request Count"]) > 0 and float(line["Max Response Time"]) > 0
            rows.append(
                Row(
                    method=line["Type"],
                    name=line["Name"],
                    requests=int(line["Request Count"]),
                    failures=int(line["Failure Count"]),
                    rps=float(line["Requests/s"]),
                    p50=_number(line["50%"]) if timed else None,
                    p95=_number(line["95%"]) if timed else None,
                    p99=_number(line["99%"]) if timed else None,
                    max_ms=float(line["Max Response Time"]) if timed else None,
                )
            )
    return rows


def read_history(out: Path) -> list[dict[str, str]]:
    with (out / f"{PREFIX}_stats_history.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def group(name: str) -> str:
    """The chart's series for an HTTP endpoint."""
    for pattern, label in (
        (r"/courses", "/courses"),
        (r"/rates/", "/rates/{b}/{q}"),
        (r"/convert", "/convert"),
        (r"/items/\[id\]", "/items/{id}"),
    ):
        if re.search(pattern, name):
            return label
    return "other"


def per_second(history: list[dict[str, str]]) -> dict[str, dict[int, tuple[float, float]]]:
    """{series: {t: (requests in that second, failures in that second)}} from the cumulative
    counts (locust's own `Requests/s` column is a moving average that starts late)."""
    last: dict[tuple[str, str], tuple[int, int]] = {}
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    start = min(int(line["Timestamp"]) for line in history)
    for line in history:
        if line["Name"] == "Aggregated":
            continue
        key = (line["Type"], line["Name"])
        count, failures = int(line["Total Request Count"]), int(line["Total Failure Count"])
        before = last.get(key, (0, 0))
        last[key] = (count, failures)
        label = group(line["Name"]) if line["Type"] in HTTP_METHODS else "WebSocket frames"
        if line["Name"] == "connect":
            label = "WebSocket connects"
        cell = series[label][int(line["Timestamp"]) - start]
        cell[0] += count - before[0]
        cell[1] += failures - before[1]
    return {label: {t: (c[0], c[1]) for t, c in cells.items()} for label, cells in series.items()}


# --- charts ------------------------------------------------------------------------------------
def chart_throughput(history: list[dict[str, str]], path: Path) -> None:
    series = per_second(history)
    http = [label for label in series if not label.startswith("WebSocket")]
    seconds = sorted({t for cells in series.values() for t in cells})
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.stackplot(
        seconds,
        [[series[label].get(t, (0, 0))[0] for t in seconds] for label in sorted(http)],
        labels=sorted(http),
        alpha=0.8,
    )
    if "WebSocket frames" in series:
        frames = series["WebSocket frames"]
        top.plot(seconds, [frames.get(t, (0, 0))[0] for t in seconds], "k--", label="WS frames")
    users = _users(history)
    twin = top.twinx()
    twin.plot(sorted(users), [users[t] for t in sorted(users)], color="grey", lw=1)
    twin.set_ylabel("users", color="grey")
    top.set_ylabel("requests / s")
    top.set_title("Requests per second (HTTP stacked by endpoint; WebSocket frames received)")
    top.legend(loc="upper left", fontsize=8)
    failures = {t: sum(cells.get(t, (0, 0))[1] for cells in series.values()) for t in seconds}
    bottom.bar(seconds, [failures[t] for t in seconds], color="tab:red", width=1.0)
    bottom.set_ylabel("failures / s")
    bottom.set_xlabel("seconds since start")
    bottom.set_title(f"Failures per second (total {sum(failures.values()):.0f})")
    bottom.set_ylim(bottom=0, top=max([1, *failures.values()]) * 1.2)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _users(history: list[dict[str, str]]) -> dict[int, int]:
    start = min(int(line["Timestamp"]) for line in history)
    return {
        int(line["Timestamp"]) - start: int(line["User Count"])
        for line in history
        if line["Name"] == "Aggregated"
    }


def chart_latency(history: list[dict[str, str]], path: Path) -> None:
    start = min(int(line["Timestamp"]) for line in history)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    total = [line for line in history if line["Name"] == "Aggregated"]
    for column, style in (("50%", "tab:green"), ("95%", "tab:orange"), ("99%", "tab:red")):
        points = [
            (int(line["Timestamp"]) - start, _number(line[column]))
            for line in total
            if _number(line[column]) is not None
        ]
        label = f"p{column[:-1]}"
        top.plot([t for t, _ in points], [v for _, v in points], color=style, label=label)
    top.set_ylabel("ms")
    top.set_title("Response time percentiles over the last 10 s (all timed requests)")
    top.legend(loc="upper left", fontsize=8)
    counts: dict[str, int] = defaultdict(int)
    for line in history:
        if line["Type"] in HTTP_METHODS and "(on start)" not in line["Name"]:
            counts[f"{line['Type']} {line['Name']}"] = int(line["Total Request Count"])
    # The two busiest requests of each endpoint (tracked and untracked pairs differ, for one).
    busiest = []
    for series in ("/courses", "/rates/{b}/{q}", "/convert", "/items/{id}"):
        members = [label for label in counts if group(label) == series]
        busiest += sorted(members, key=counts.__getitem__, reverse=True)[:2]
    for label in busiest:
        method, name = label.split(" ", 1)
        points = [
            (int(line["Timestamp"]) - start, _number(line["95%"]))
            for line in history
            if line["Type"] == method and line["Name"] == name and _number(line["95%"]) is not None
        ]
        bottom.plot([t for t, _ in points], [v for _, v in points], label=label, lw=1.2)
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds since start")
    bottom.set_title("p95 per request over the last 10 s (the two busiest of each endpoint)")
    bottom.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def chart_rss(rows: list[tuple[float, int, str, int]], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(10, 3.2))
    by_pid: dict[int, list[tuple[float, int]]] = defaultdict(list)
    roles = {}
    for seconds, pid, role, rss in rows:
        by_pid[pid].append((seconds, rss))
        roles[pid] = role
    for pid, points in sorted(by_pid.items()):
        axes.plot([s for s, _ in points], [r / MIB for _, r in points], label=f"{roles[pid]} {pid}")
    axes.set_ylabel("RSS, MiB")
    axes.set_xlabel("seconds since start")
    axes.set_ylim(bottom=0)
    axes.set_title("Resident memory of the web processes (ps -o rss, every second)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# --- summary -----------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def summary_table(rows: list[Row], http_total: dict[str, float]) -> list[str]:
    lines = [
        "| request | count | req/s | failures | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = ["/courses", "/rates/{b}/{q}", "/convert", "/items/{id}", "other"]
    http = sorted(
        (r for r in rows if r.method in HTTP_METHODS),
        key=lambda r: (order.index(group(r.name)), r.name, r.method),
    )
    sockets = sorted((r for r in rows if r.method not in HTTP_METHODS), key=lambda r: -r.requests)
    for row in http:
        lines.append(
            f"| {row.method} `{row.name}` | {row.requests:,} | {row.rps:,.1f} | {row.failures:,} "
            f"| {_ms(row.p50)} | {_ms(row.p95)} | {_ms(row.p99)} | {_ms(row.max_ms)} |"
        )
    lines.append(
        f"| **HTTP total** | **{http_total['requests']:,}** | **{http_total['rps']:,.1f}** "
        f"| **{http_total['failures']:,}** | **{_ms(http_total['p50'])}** "
        f"| **{_ms(http_total['p95'])}** | **{_ms(http_total['p99'])}** "
        f"| **{_ms(http_total['max'])}** |"
    )
    for row in sockets:
        lines.append(
            f"| WS {row.name} | {row.requests:,} | {row.rps:,.1f} | {row.failures:,} "
            f"| {_ms(row.p50)} | {_ms(row.p95)} | {_ms(row.p99)} | {_ms(row.max_ms)} |"
        )
    return lines


def rss_table(sampler: Sampler) -> list[str]:
    lines = ["| web process | pid | RSS at start | peak RSS |", "|---|---|---|---|"]
    for pid, (role, first, peak) in sorted(sampler.peaks().items(), key=lambda p: p[1][0]):
        lines.append(f"| {role} | {pid} | {first / MIB:.1f} MiB | {peak / MIB:.1f} MiB |")
    return lines


def working_directory(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _short(command: str) -> str:
    # `/work/x/.venv/bin/python manage.py qcluster` -> `python manage.py qcluster`
    words = command.split()
    text = " ".join(Path(w).name if w.startswith("/") else w for w in words)
    return text if len(text) <= 48 else text[:47] + "…"


def shared_cores(sampler: Sampler, locust_pid: int, seconds: float) -> str:
    """CPU seconds used during the run: the web processes, the rest of `make run`, locust and
    the busiest other processes (the machine's other sessions)."""
    used = sampler.cpu_used()
    web = set(sampler.roles)
    # `make run`'s other processes (honcho, fetcher, qcluster, NATS) run where the web does.
    kurs_dirs = {working_directory(pid) for pid in web} - {None}
    buckets = {"web": 0.0, "kurs": 0.0, "locust": 0.0}
    others: dict[str, float] = defaultdict(float)
    for pid, (command, cpu) in used.items():
        if pid in web:
            buckets["web"] += cpu
        elif pid == locust_pid:
            buckets["locust"] += cpu
        elif pid == os.getpid():
            continue
        elif working_directory(pid) in kurs_dirs:
            buckets["kurs"] += cpu
        else:
            others[_short(command)] += cpu
    busiest = sorted(((cpu, name) for name, cpu in others.items() if cpu >= 1.0), reverse=True)
    listed = "; ".join(f"`{name}` {cpu:.0f} s" for cpu, name in busiest[:5]) or "none over 1 s"
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"CPU seconds over the {seconds:.0f} s run on {os.cpu_count()} cores "
        f"({(os.cpu_count() or 1) * seconds:.0f} available): web processes {buckets['web']:.0f}, "
        f"the rest of `make run` (fetcher, qcluster, …) {buckets['kurs']:.0f}, "
        f"locust {buckets['locust']:.0f}, other processes {sum(others.values()):.0f} "
        f"(busiest: {listed}); load average at the end {load}."
    )


def failures_lines(out: Path) -> list[str]:
    path = out / f"{PREFIX}_failures.csv"
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: -int(r["Occurrences"]))
    return [f"- {r['Method']} `{r['Name']}`: {r['Error']} ({r['Occurrences']}×)" for r in rows[:8]]


# --- main --------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("KURS_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("KURS_PORT", "8000")))
    parser.add_argument("--users", type=int, default=200, help="all users, sockets included")
    parser.add_argument("--ws-clients", type=int, default=10, help="of --users: /ws/items ones")
    parser.add_argument("--spawn-rate", type=float, default=20.0, help="users started per second")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "loadtest")
    args = parser.parse_args()
    origin = f"http://{args.host}:{args.port}"
    if error := service_error(origin):
        print(f"loadtest: {error}: start `make run` first (KURS_PORT picks its port)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(args.port)
    sampler.start()
    started_at = datetime.now(UTC)
    started = time.monotonic()
    code, locust_pid = run_locust(args, origin, args.out)
    sampler.stop()
    elapsed = time.monotonic() - started
    if not (args.out / f"{PREFIX}_stats_history.csv").exists():
        print("loadtest: locust wrote no statistics; see its output above")
        return code or 1
    sampler.write_csv(args.out / "rss.csv")
    history = read_history(args.out)
    chart_throughput(history, args.out / "throughput.png")
    chart_latency(history, args.out / "latency.png")
    chart_rss(sampler.rows, args.out / "rss.png")
    http_total = json.loads((args.out / f"{PREFIX}_http_total.json").read_text())
    lines = [
        f"Load test {started_at:%Y-%m-%d %H:%M} UTC: {args.users} users "
        f"({args.ws_clients} of them /ws/items clients), spawned at {args.spawn_rate:g}/s, "
        f"{args.seconds} s against {origin} (bench/locustfile.py, `make loadtest`).",
        "",
        *summary_table(read_stats(args.out), http_total),
        "",
        *rss_table(sampler),
        "",
        shared_cores(sampler, locust_pid, elapsed),
    ]
    if http_total.get("courses_missing"):
        lines += ["", "`/api/v1/courses` answered 404 on this server: its tasks were skipped."]
    if failed := failures_lines(args.out):
        lines += ["", "Failures:", *failed]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"\nWritten to {args.out}: summary.md, throughput.png, latency.png, rss.png, CSVs, HTML")
    return code


if __name__ == "__main__":
    sys.exit(main())
