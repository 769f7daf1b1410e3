"""`/courses`, item detail, `/rates` and `/convert` under load, each beside an in-run baseline.

    .venv/bin/python bench/bench_courses.py [--duration 4] [--repeats 3] [--connections 64]
    .venv/bin/python bench/bench_courses.py --servers    # the server choice, measured
    .venv/bin/python bench/bench_courses.py --floor      # the floor: a bare app, same server

The web server is the production one (`scripts/serve.sh`'s uvicorn with uvloop and Kurs's HTTP
protocol, `edge/serverprotocol.py`: uvicorn's httptools protocol sending each answer in one write)
on a free port, production settings (DEBUG off), SQLite on a temporary file, with the project's
own `config.asgi:application` and a nats-server of its own (the machine's NATS keeps no trace);
load comes from wrk (`-t1 -c64`, keep-alive) on 127.0.0.1.
Figures are medians of --repeats runs of --duration seconds, each printed with its baseline, as
req/s and as the CPU time the server (all its processes) used per request answered; "by CPU" is
the baseline's CPU per request over the figure's, the ratio the req/s one tends to on cores of
its own (on a loaded machine every process gets an equal share, and req/s ratios shrink to 1):

1. `GET /api/v1/courses` (the edge's route table, `edge/routes.py`) with 1 and 2 workers, against a
   minimal FastAPI app on stock uvicorn (uvloop, httptools, same workers) and nginx serving the
   same bytes as a static file (same worker count): targets >= 3x FastAPI, >= 0.25x nginx;
2. the 304 path (`If-None-Match` with the current ETag), against the 200 path;
3. item detail `GET /api/v1/items/1`, `GET /api/v1/rates/BTC/USD` and
   `GET /api/v1/convert?from=BTC&to=USD&amount=0.5` (all from memory, by the route table) against a
   plain django-ninja endpoint on the same server returning the item's bytes
   (`bench/plain_urls.py`), the floor of Django's request path: target >= 1.3x.

`--servers` measures `/courses` and item detail with 1 and 2 workers on uvicorn with Kurs's
protocol, on stock uvicorn (httptools) and on granian: the
measurement behind the server `make run` uses (README, "Serving").

`--floor` measures `/courses` with 1 and 2 workers against the floor of the server it runs on: a
bare ASGI app (`bench/floor_app.py`: no edge, no Django, no log) answering the same bytes with
the same headers on the same uvicorn and Kurs's protocol, and on stock uvicorn, each beside
FastAPI in the same run. What the floor costs per request, any app on that server pays.

wrk, the servers and every other session on this machine share its cores: the load average and
the busiest other processes are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wrk import bench_run, wrk  # noqa: E402

from tests.services import free_port, wait_for_port  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
COURSES = "/api/v1/courses"
ITEM = "/api/v1/items/1"
PAIR = "/api/v1/rates/BTC/USD"
CONVERT = "/api/v1/convert?from=BTC&to=USD&amount=0.5"
PLAIN = "/bench/plain/item"
KURS_HTTP = "edge.serverprotocol:KursHttpProtocol"  # as scripts/serve.sh
START_TIMEOUT = 60.0

SEED_RATES = textwrap.dedent(
    """
    from datetime import UTC, datetime
    from decimal import Decimal
    from items.models import Item
    from rates.models import CurrentRate, Rate
    now = datetime.now(UTC)
    for n, item in enumerate(Item.objects.filter(is_active=True).order_by("id")):
        # Two providers, so the body is "mixed"; both stay fresh for the whole run (CoinGecko's
        # own window of 120 s would flip its courses to stale mid-bench).
        provider = "cbr" if item.quote == "RUB" else "binance"
        value = Decimal("54000.000123") / (n + 1)
        Rate.objects.create(
            item=item, provider=provider, value=value, source_time=now, received_at=now
        )
        CurrentRate.objects.create(
            item=item, provider=provider, value=value, source_time=now, checked_at=now,
            received_at=now, status="live", version=1,
        )
    """
)


# --- load ------------------------------------------------------------------------------------
Target = tuple[str, str | None]  # (url, one extra request header)
# (req/s, p99 ms, CPU microseconds the server used per request)
Figure = tuple[float, float, float]
# The process group of each running server, by origin: its CPU time per request is measured.
GROUPS: dict[str, int] = {}


def group_cpu(group: int) -> float:
    """CPU seconds used so far by the processes of a process group (a server and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def measure(targets: dict[str, Target], args: argparse.Namespace) -> dict[str, Figure]:
    """Median req/s, p99 and server CPU per request of each target, measured in turns (A B C,
    A B C, ...).

    Taking turns spreads the other sessions' load on this machine evenly over a figure and its
    baseline, so their ratio holds even when the absolute figures drift. The CPU time a server
    used per request answered does not depend on how much of the cores it got: on a loaded
    machine it is the steadier comparison (the req/s ratio shrinks towards 1 when every process
    gets an equal share of too few cores).
    """
    runs: dict[str, list[Figure]] = {name: [] for name in targets}
    for _ in range(args.repeats):
        for name, (url, header) in targets.items():
            group = GROUPS[url[: url.index("/", len("http://"))]]
            cpu = group_cpu(group)
            rps, p99, count = wrk(url, args.duration, args.connections, header)
            runs[name].append((rps, p99, (group_cpu(group) - cpu) / count * 1e6))
    return {
        name: (
            statistics.median(r for r, _, _ in got),
            statistics.median(p for _, p, _ in got),
            statistics.median(c for _, _, c in got),
        )
        for name, got in runs.items()
    }


def get(url: str, header: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=dict([header]) if header else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# --- servers ---------------------------------------------------------------------------------
def server_env(tmp: Path, nats_port: int, log_level: str = "INFO") -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KURS_", "DJANGO_")) and key != "DATABASE_URL"
    }
    env.update(
        DJANGO_SETTINGS_MODULE="bench.plain_settings",
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="kurs-bench-secret-key-not-for-production-0123456789",
        DATABASE_URL=f"sqlite:///{tmp}/bench.sqlite3",
        # INFO: Kurs writes its access log (one line per request) to the server's output, as in
        # production; the baselines write none.
        KURS_LOG_LEVEL=log_level,
        # The bench's own nats-server: the machine's keeps no stream or subject of the run.
        NATS_URL=f"nats://127.0.0.1:{nats_port}",
        # Courses stay fresh for the whole run (stable ETags).
        KURS_STALE_AFTER="86400",
        KURS_SHARED_CACHE_DIR=str(tmp / "cache"),
        KURS_BENCH_ITEM_BODY=str(tmp / "item.json"),
        KURS_BENCH_COURSES_BODY=str(tmp / "www" / "api" / "v1" / "courses"),
        KURS_BENCH_COURSES_HEADERS=str(tmp / "courses-headers.json"),
        PYTHONPATH=str(REPO),
    )
    return env


def uvicorn_cmd(app: str, port: int, workers: int, http: str = "httptools") -> list[str]:
    return [
        str(VENV_BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--loop", "uvloop", "--http", http,
        "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
    ]  # fmt: skip


def kurs_cmd(app: str, port: int, workers: int) -> list[str]:
    """Kurs as scripts/serve.sh serves it: uvicorn with Kurs's HTTP protocol."""
    return uvicorn_cmd(app, port, workers, KURS_HTTP)


def granian_cmd(app: str, port: int, workers: int) -> list[str]:
    return [
        str(VENV_BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers), "--loop", "uvloop",
        "--no-access-log", "--log-level", "warning", app,
    ]  # fmt: skip


def nginx_cmd(tmp: Path, port: int, workers: int) -> list[str]:
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            worker_processes {workers};
            pid {tmp}/nginx-{port}.pid;
            error_log {tmp}/nginx-{port}.error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                sendfile on;
                keepalive_requests 1000000;
                client_body_temp_path {tmp}/nginx-body;
                proxy_temp_path {tmp}/nginx-proxy;
                fastcgi_temp_path {tmp}/nginx-fastcgi;
                uwsgi_temp_path {tmp}/nginx-uwsgi;
                scgi_temp_path {tmp}/nginx-scgi;
                server {{
                    listen 127.0.0.1:{port};
                    root {tmp}/www;
                    location = {COURSES} {{ default_type "application/json; charset=utf-8"; }}
                }}
            }}
            """
        )
    )
    return ["nginx", "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"]


@contextmanager
def running(cmd: list[str], env: dict[str, str], port: int, ready: str) -> Iterator[str]:
    """Start a server in its own process group; yield its origin once `ready` answers 200."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        origin = f"http://127.0.0.1:{port}"
        GROUPS[origin] = proc.pid
        try:
            wait_for_port(port, START_TIMEOUT)
            deadline = time.monotonic() + START_TIMEOUT
            while get(origin + ready)[0] != 200:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log.seek(0)
                    output = log.read().decode()
                    raise SystemExit(f"bench: {cmd[0]} did not serve {ready}:\n{output}")
                time.sleep(0.1)
            yield origin
        finally:
            # SIGTERM to the group: the servers' supervisors and workers, nginx's too.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def warm(origin: str, path: str, workers: int) -> None:
    # Each worker loads its snapshot at start-up; a second of load reaches every one of them.
    wrk(origin + path, 1.0, 8 * workers)


# --- the bench -------------------------------------------------------------------------------
def prepare(tmp: Path, nats_port: int, log_level: str) -> dict[str, str]:
    env = server_env(tmp, nats_port, log_level)
    (tmp / "www" / "api" / "v1").mkdir(parents=True)
    (tmp / "item.json").write_bytes(b"{}")
    for args in (
        ["manage.py", "migrate", "--no-input", "-v", "0"],
        ["manage.py", "shell", "-c", SEED_RATES],
    ):
        subprocess.run([PYTHON, *args], cwd=REPO, env=env, check=True, timeout=120)
    return env


def capture_bodies(tmp: Path, env: dict[str, str]) -> tuple[bytes, str]:
    """The `/courses` and item bytes Kurs serves, written where the baselines read them."""
    port = free_port()
    with running(kurs_cmd("config.asgi:application", port, 1), env, port, COURSES) as origin:
        status, headers, courses = get(origin + COURSES)
        assert status == 200, courses
        assert b'"courses":[{' in courses, courses
        item_status, _, item = get(origin + ITEM)
        assert item_status == 200, item
        for path in (PAIR, CONVERT):
            status, _, body = get(origin + path)
            assert status == 200, (path, body)
    (tmp / "www" / "api" / "v1" / "courses").write_bytes(courses)
    # The app's own headers, for the floor (the server adds `date` and `server` itself; urllib
    # asked for `connection: close`).
    own = [(n, v) for n, v in headers.items() if n not in ("date", "server", "connection")]
    (tmp / "courses-headers.json").write_text(json.dumps(own))
    (tmp / "item.json").write_bytes(item)
    # nginx's workers may run as another user: the files must be readable by anyone.
    for written in [tmp, *tmp.rglob("*")]:
        written.chmod(0o755 if written.is_dir() else 0o644)
    return courses, headers["etag"]


def row(label: str, figure: Figure, base_label: str, base: Figure, target: str = "") -> None:
    ratio = figure[0] / base[0] if base[0] else float("nan")
    cpu_ratio = base[2] / figure[2] if figure[2] else float("nan")
    print(
        f"{label:<34} {figure[0]:>9,.0f} {figure[1]:>8.2f} {figure[2]:>7.0f}   {base_label:<30} "
        f"{base[0]:>9,.0f} {base[1]:>8.2f} {base[2]:>7.0f} {ratio:>7.2f}x {cpu_ratio:>7.2f}x  "
        f"{target}"
    )


def header_line() -> None:
    print(
        f"{'figure':<34} {'req/s':>9} {'p99 ms':>8} {'CPU us':>7}   {'baseline (same run)':<30} "
        f"{'req/s':>9} {'p99 ms':>8} {'CPU us':>7} {'ratio':>8} {'by CPU':>8}  target"
    )


def bench(
    args: argparse.Namespace, tmp: Path, env: dict[str, str], courses: bytes, etag: str
) -> None:
    results: dict[str, Figure] = {}
    for workers in (1, 2):
        kurs_port, fastapi_port, nginx_port = free_port(), free_port(), free_port()
        kurs_server = kurs_cmd("config.asgi:application", kurs_port, workers)
        fastapi_server = uvicorn_cmd("bench.fastapi_app:app", fastapi_port, workers)
        with (
            running(kurs_server, env, kurs_port, COURSES) as kurs,
            running(fastapi_server, env, fastapi_port, COURSES) as fastapi,
            running(nginx_cmd(tmp, nginx_port, workers), env, nginx_port, COURSES) as nginx,
        ):
            for origin in (kurs, fastapi, nginx):
                warm(origin, COURSES, workers)
                assert get(origin + COURSES)[2] == courses, f"{origin} serves other bytes"
            targets: dict[str, Target] = {
                f"courses{workers}": (kurs + COURSES, None),
                f"fastapi{workers}": (fastapi + COURSES, None),
                f"nginx{workers}": (nginx + COURSES, None),
                f"304-{workers}": (kurs + COURSES, f"If-None-Match: {etag}"),
            }
            if workers == 1:
                targets["item"] = (kurs + ITEM, None)
                targets["pair"] = (kurs + PAIR, None)
                targets["convert"] = (kurs + CONVERT, None)
                targets["plain"] = (kurs + PLAIN, None)
            results.update(measure(targets, args))
            after = get(kurs + COURSES)[2]
            assert after == courses, f"/courses changed during the bench: {courses!r} -> {after!r}"
    print(
        f"wrk -t1 -c{args.connections}, {args.repeats} x {args.duration:g} s each, medians; "
        f"Kurs KURS_LOG_LEVEL={args.log_level}; "
        f"uvicorn --loop uvloop, Kurs --http {KURS_HTTP}, FastAPI --http httptools; "
        f"/courses body {len(courses)} bytes"
    )
    header_line()
    for w in (1, 2):
        n = f"{w} worker{'s' if w > 1 else ''}"
        row(
            f"/courses, {n}",
            results[f"courses{w}"],
            f"FastAPI+uvicorn, {n}",
            results[f"fastapi{w}"],
            ">= 3x" if w == 2 else ">= 2x",
        )
        row(
            f"/courses, {n}",
            results[f"courses{w}"],
            f"nginx static file, {n}",
            results[f"nginx{w}"],
            ">= 0.25x",
        )
        row(
            f"/courses 304 (If-None-Match), {n}",
            results[f"304-{w}"],
            f"/courses 200, {n}",
            results[f"courses{w}"],
        )
    for key, label in (
        ("item", "item detail /items/1, 1 worker"),
        ("pair", "/rates/BTC/USD, 1 worker"),
        ("convert", "/convert (GET), 1 worker"),
    ):
        row(label, results[key], "plain django-ninja, 1 worker", results["plain"], ">= 1.3x")


def compare_servers(args: argparse.Namespace, env: dict[str, str]) -> None:
    results: dict[tuple[str, int], tuple[Figure, Figure]] = {}
    servers = (("uvicorn+kurs", kurs_cmd), ("uvicorn", uvicorn_cmd), ("granian", granian_cmd))
    for name, make in servers:
        for workers in (1, 2):
            port = free_port()
            with running(
                make("config.asgi:application", port, workers), env, port, COURSES
            ) as origin:
                warm(origin, COURSES, workers)
                got = measure(
                    {"courses": (origin + COURSES, None), "item": (origin + ITEM, None)}, args
                )
                results[name, workers] = (got["courses"], got["item"])
    print(f"wrk -t1 -c{args.connections}, {args.repeats} x {args.duration:g} s each, medians")
    print(
        f"{'server':<12} {'workers':>7} {'/courses req/s':>15} {'p99 ms':>8} "
        f"{'CPU us':>7} {'/items/1 req/s':>15} {'p99 ms':>8} {'CPU us':>7}"
    )
    for (name, workers), (courses, item) in results.items():
        print(
            f"{name:<12} {workers:>7} {courses[0]:>15,.0f} {courses[1]:>8.2f} {courses[2]:>7.0f} "
            f"{item[0]:>15,.0f} {item[1]:>8.2f} {item[2]:>7.0f}"
        )


def floor(args: argparse.Namespace, env: dict[str, str], courses: bytes) -> None:
    """`/courses` with the access log on and off against the floor of its server
    (`bench/floor_app.py`) and FastAPI."""
    results: dict[str, Figure] = {}
    floor_app = "bench.floor_app:app"
    quiet = {**env, "KURS_LOG_LEVEL": "WARNING"}
    for workers in (1, 2):
        ports = [free_port() for _ in range(5)]
        servers = (
            ("kurs", kurs_cmd("config.asgi:application", ports[0], workers), env),
            ("quiet", kurs_cmd("config.asgi:application", ports[1], workers), quiet),
            ("floor", kurs_cmd(floor_app, ports[2], workers), env),
            ("stock", uvicorn_cmd(floor_app, ports[3], workers), env),
            ("fastapi", uvicorn_cmd("bench.fastapi_app:app", ports[4], workers), env),
        )
        with ExitStack() as stack:
            origins = {
                name: stack.enter_context(running(cmd, server_env, port, COURSES))
                for (name, cmd, server_env), port in zip(servers, ports, strict=True)
            }
            for origin in origins.values():
                warm(origin, COURSES, workers)
                assert get(origin + COURSES)[2] == courses, f"{origin} serves other bytes"
            heads = {name: get(origin + COURSES)[1] for name, origin in origins.items()}
            assert heads["floor"].keys() == heads["kurs"].keys(), heads
            got = measure({name: (o + COURSES, None) for name, o in origins.items()}, args)
            results.update({f"{name}{workers}": figure for name, figure in got.items()})
    print(
        f"wrk -t1 -c{args.connections}, {args.repeats} x {args.duration:g} s each, medians; "
        f"Kurs KURS_LOG_LEVEL={args.log_level} (log off: WARNING); the floor: "
        "bench/floor_app.py, the same bytes and headers, no edge, no log"
    )
    header_line()
    for w in (1, 2):
        n = f"{w} worker{'s' if w > 1 else ''}"
        fastapi = f"FastAPI+uvicorn, {n}"
        for key, label in (
            ("floor", "floor, uvicorn+Kurs protocol"),
            ("stock", "floor, stock uvicorn"),
            ("quiet", "/courses, access log off"),
            ("kurs", "/courses"),
        ):
            target = ">= 3x" if key == "kurs" and w == 2 else ""
            row(f"{label}, {n}", results[f"{key}{w}"], fastapi, results[f"fastapi{w}"], target)
        row(f"/courses, {n}", results[f"kurs{w}"], f"floor, {n}", results[f"floor{w}"])
        row(
            f"/courses, access log off, {n}",
            results[f"quiet{w}"],
            f"floor, {n}",
            results[f"floor{w}"],
        )


def run(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> None:
    courses, etag = capture_bodies(tmp, env)
    if args.servers:
        compare_servers(args, env)
    elif args.floor:
        floor(args, env, courses)
    else:
        bench(args, tmp, env, courses, etag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--servers", action="store_true", help="compare uvicorn and granian")
    parser.add_argument(
        "--floor", action="store_true", help="/courses against a bare app on the same server"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="Kurs's KURS_LOG_LEVEL (INFO: the access log on; WARNING: off)",
    )
    args = parser.parse_args()
    with bench_run("kurs-bench-courses-", ("wrk", "nginx")) as (tmp, nats_port):
        run(args, tmp, prepare(tmp, nats_port, args.log_level))


if __name__ == "__main__":
    main()
