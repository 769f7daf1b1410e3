"""`make loadtest`'s parts: the locust file's users and mix (bench/locustfile.py), the discovery
and RSS sampling of the web processes (bench/rss_sample.py) and the report (bench/loadtest.py).

Locust is never run here. Importing it monkey-patches the standard library with gevent, so the
locust file is only imported in a child process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services import ROOT, START_TIMEOUT, free_port, wait_for_port

BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "bench"))

import loadtest  # noqa: E402
import rss_sample  # noqa: E402

DESCRIBE_USERS = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "bench")
    import locustfile
    from locust import User
    users = {}
    for name, cls in vars(locustfile).items():
        if isinstance(cls, type) and issubclass(cls, User) and not cls.abstract:
            tasks = {}
            for function in cls.tasks:  # @task(n) puts a task n times in the list
                tasks[function.__name__] = tasks.get(function.__name__, 0) + 1
            users[name] = {
                "tasks": tasks,
                "fixed_count": cls.fixed_count,
                "waits": [cls.wait_time(None) for _ in range(50)],
            }
    print(json.dumps(users))
    """
)


def describe_users(ws_clients: int) -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", DESCRIBE_USERS],
        cwd=ROOT,
        env={**os.environ, "LOADTEST_WS_CLIENTS": str(ws_clients)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_it_lists_the_api_and_the_socket_users_to_locust() -> None:
    result = subprocess.run(
        [str(BIN / "locust"), "-f", "bench/locustfile.py", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split()
    assert "ApiUser" in listed
    assert "SocketUser" in listed


def test_it_weights_the_mix_towards_courses_and_covers_every_read() -> None:
    users = describe_users(ws_clients=3)
    assert set(users) == {"ApiUser", "SocketUser"}
    api = users["ApiUser"]["tasks"]
    assert set(api) == {
        "courses",
        "courses_revalidated",
        "courses_filtered",
        "courses_one_exchanger",
        "rate_tracked",
        "rate_untracked",
        "convert_get",
        "convert_post",
        "item_detail",
    }
    courses = sum(weight for name, weight in api.items() if name.startswith("courses"))
    assert courses / sum(api.values()) > 0.5
    # Revalidating with the last ETag is the commonest request, as from a polling dashboard.
    assert max(api, key=api.__getitem__) == "courses_revalidated"
    assert users["ApiUser"]["fixed_count"] == 0  # the rest of --users
    assert all(0.2 <= wait <= 0.8 for wait in users["ApiUser"]["waits"])
    sockets = users["SocketUser"]
    assert sockets["fixed_count"] == 3  # LOADTEST_WS_CLIENTS
    assert sockets["tasks"] == {"ping": 1}


def test_it_counts_only_http_requests_in_the_http_total() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, "bench")
        import locustfile
        from locust.env import Environment
        env = Environment(user_classes=[locustfile.ApiUser])
        for method, name, ms in [("GET", "/a", 10), ("GET", "/a", 30), ("POST", "/b", 50)]:
            env.stats.log_request(method, name, ms, 100)
        env.stats.log_error("POST", "/b", "boom")
        env.stats.log_request("WS", "connect", 900, 10)
        for _ in range(100):
            env.stats.log_request("WS", "recv rate.updated", None, 10)
        total = locustfile.http_total(env)
        print(json.dumps([total.num_requests, total.num_failures, total.max_response_time]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [3, 1, 50]


@pytest.fixture
def uvicorn_two_workers(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "tiny_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "uvicorn"),
            "tiny_app:app",
            "--app-dir",
            str(tmp_path),
            "--port",
            str(port),
            "--workers",
            "2",
            "--lifespan",
            "off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, START_TIMEOUT, process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_it_finds_the_supervisor_and_the_workers_by_their_listening_socket(
    uvicorn_two_workers: int,
) -> None:
    # The workers take the socket a moment after the supervisor opened it.
    deadline = time.monotonic() + 30
    roles = rss_sample.web_processes(uvicorn_two_workers)
    while sorted(roles.values()) != ["supervisor", "worker", "worker"]:
        assert time.monotonic() < deadline, roles
        time.sleep(0.05)
        roles = rss_sample.web_processes(uvicorn_two_workers)
    sizes = rss_sample.rss_kib(list(roles))
    assert set(sizes) == set(roles)
    assert all(size > 1024 for size in sizes.values())  # a Python process holds over 1 MiB
    assert rss_sample.web_processes(free_port()) == {}


def test_it_samples_a_single_process_server_as_web(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, START_TIMEOUT, server)
        sampler = rss_sample.Sampler(port, interval=0.05)
        sampler.start()
        sampler.stop()
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert sampler.roles == {server.pid: "web"}
    role, first, peak = sampler.peaks()[server.pid]
    assert role == "web"
    assert 1024 < first <= peak
    # The server itself ran through the sampling, so its CPU time is accounted for.
    assert server.pid in sampler.cpu_used()


HISTORY_HEADER = (
    "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,"
    "99.9%,99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,"
    "Total Average Response Time,Total Min Response Time,Total Max Response Time,"
    "Total Average Content Size"
)
STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,"
    "75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


def history_row(t: int, kind: str, name: str, count: int, failures: int, p: str) -> str:
    percentiles = ",".join([p] * 11)
    return f"{t},10,{kind},{name},0,0,{percentiles},{count},{failures},1,1,1,1,1"


def test_it_counts_requests_per_second_from_locusts_cumulative_history(tmp_path: Path) -> None:
    lines = [HISTORY_HEADER]
    steps = ((100, 0, 0, 0, 0), (101, 50, 5, 1, 7), (102, 130, 9, 1, 20))
    for t, courses, rates, failed, frames in steps:
        lines.append(history_row(t, "GET", "/api/v1/courses", courses, 0, "3"))
        lines.append(history_row(t, "GET", "/api/v1/rates/BTC/USD", rates, failed, "20"))
        lines.append(history_row(t, "WS", "recv rate.updated", frames, 0, "N/A"))
        lines.append(history_row(t, "", "Aggregated", courses + rates + frames, failed, "4"))
    (tmp_path / "locust_stats_history.csv").write_text("\n".join(lines) + "\n")
    history = loadtest.read_history(tmp_path)

    series = loadtest.per_second(history)

    assert series["/courses"] == {0: (0, 0), 1: (50, 0), 2: (80, 0)}
    assert series["/rates/{b}/{q}"] == {0: (0, 0), 1: (5, 1), 2: (4, 0)}
    assert series["WebSocket frames"] == {0: (0, 0), 1: (7, 0), 2: (13, 0)}
    loadtest.chart_throughput(history, tmp_path / "throughput.png")
    loadtest.chart_latency(history, tmp_path / "latency.png")
    loadtest.chart_rss(
        [(0.0, 7, "worker", 100_000), (1.0, 7, "worker", 120_000)], tmp_path / "rss.png"
    )
    for chart in ("throughput.png", "latency.png", "rss.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_it_summarises_each_request_the_http_total_and_the_socket_frames(tmp_path: Path) -> None:
    with (tmp_path / "locust_stats.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(STATS_HEADER.split(","))
        percentiles = ["5", "6", "7", "8", "9", "12", "15", "21", "40", "40", "40"]
        writer.writerow(
            ["GET", "/api/v1/items/[id]", 40, 2, 5, 6, 1, 40.2, 300, 0.7, 0, *percentiles]
        )
        writer.writerow(["GET", "/api/v1/courses", 900, 0, 1, 2, 0, 9.9, 600, 15.0, 0, *["1"] * 11])
        writer.writerow(["WS", "recv rate.updated", 300, 0, 0, 0, 0, 0, 350, 5.0, 0, *["0"] * 11])
        writer.writerow(["", "Aggregated", 1240, 2, 1, 2, 0, 40.2, 500, 20.7, 0, *["1"] * 11])
    total = {
        "requests": 940,
        "failures": 2,
        "rps": 15.7,
        "p50": 1,
        "p95": 9,
        "p99": 20,
        "max": 40.2,
    }

    table = loadtest.summary_table(loadtest.read_stats(tmp_path), total)

    assert table[2:] == [
        "| GET `/api/v1/courses` | 900 | 15.0 | 0 | 1 | 1 | 1 | 10 |",
        "| GET `/api/v1/items/[id]` | 40 | 0.7 | 2 | 5 | 12 | 21 | 40 |",
        "| **HTTP total** | **940** | **15.7** | **2** | **1** | **9** | **20** | **40** |",
        "| WS recv rate.updated | 300 | 5.0 | 0 | – | – | – | – |",
    ]


def test_it_says_start_make_run_first_when_nothing_answers() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "bench/loadtest.py", "--port", str(port), "--out", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"nothing answers on http://127.0.0.1:{port}" in result.stdout
    assert "start `make run` first" in result.stdout
