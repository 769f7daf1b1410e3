"""`make test-prod` (docs/operations.md#make-test-prod): the production process set, natively,
checked through nginx.

    .venv/bin/python -m tests.prod_stack [--keep-logs]

What docker-compose.yml runs, without Docker: two web processes (`scripts/serve.sh`, one uvicorn
worker each, on two ports) behind Debian's nginx running the repo's `deploy/nginx.conf` (rendered
with the upstream addresses, as compose's nginx image renders it), `qcluster`, the fetcher
(`run_fetch --watch`) on the exchange emulator (`run_emulator`), against the machine's
PostgreSQL (a database of its own, created fresh and dropped at the end), Redis (database
`REDIS_DB`, flushed before and after) and NATS (a subject prefix and JetStream stream of its
own), with production settings: DJANGO_DEBUG=false, JSON logs, a generated secret key.

Checked through nginx: health, `/courses`, items CRUD with an API key from `create_api_key`,
`/ws/items` and the SSE stream each receiving a rate update, a failover when binance goes down at
the emulator (and back), gzip and static files, `/metrics` closed to the public, `/courses`
served from nginx's cache by its query string and an error never;
each process's metrics (web `/metrics`, the fetcher's and qcluster's KURS_METRICS_PORT) pass
`promtool check metrics` and name every metric of the Grafana dashboard; nginx's request-rate
limit answers 429; then one web process is SIGKILLed under load and nginx keeps serving from the
other with no failed request. Measured and printed: the start-to-first-rate time of the set,
`/courses` req/s through nginx with two web processes against nginx serving the same bytes as a
static file (same nginx, same run, wrk), and the run's duration. Every process started is
stopped, the database dropped.

PostgreSQL, Redis or NATS absent, or nginx, promtool or wrk missing (`make test-prod` installs
Debian's packages when it can): SKIPPED with the reason, a failure under CI=true.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect

from realtime.nats.subjects import stream_name
from tests.services import POSTGRES_URL, ROOT, free_port, in_ci, port_open, wait_for_port

NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kurs.json"
PYTHON = sys.executable
REDIS_DB = 9
TOOLS = ("nginx", "promtool", "wrk")
COURSES = "/api/v1/courses"
PAIR = "BTC-USD"
START_TIMEOUT = 60.0
# The bench's nginx limit (the template's limit stays in the path): far above what nginx serves
# from its cache here (40,000+ req/s: nginx counts time in milliseconds, so 64 connections send
# more than compose's burst of 100 within one); the limit check reloads with compose's default.
BENCH_RATE, BENCH_BURST = "100000r/s", "100000"
COMPOSE_RATE, COMPOSE_BURST = "50r/s", "100"


# --- the nginx template ------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def render_template(text: str, values: Mapping[str, str | Sequence[str]]) -> str:
    """`${NAME}` replaced from `values`, envsubst-style; a list value repeats its whole line.

    Only upper-case `${NAME}`s are placeholders (nginx's own variables are lower-case `$name`);
    one without a value is an error, not an empty string.
    """
    lines = []
    for line in text.splitlines(keepends=True):
        names = _PLACEHOLDER.findall(line)
        missing = [name for name in names if name not in values]
        if missing:
            raise KeyError(f"no value for ${{{missing[0]}}} in: {line.strip()}")
        listed = [name for name in names if not isinstance(values[name], str)]
        copies: list[str | None] = list(values[listed[0]]) if listed else [None]
        for item in copies:

            def value(match: re.Match[str], item: str | None = item) -> str:
                got = values[match.group(1)]
                return got if isinstance(got, str) else str(item)

            lines.append(_PLACEHOLDER.sub(value, line))
    return "".join(lines)


def nginx_main_conf(folder: Path, site: Path, extra_http: str = "") -> Path:
    """A whole nginx.conf around the http-context `site`, every path inside `folder`.

    The official image's nginx.conf gives the same context: one `http` block including conf.d.
    """
    conf = folder / "nginx-main.conf"
    conf.write_text(
        f"""worker_processes 2;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {folder}/nginx-access.log;
    sendfile on;
    client_body_temp_path {folder}/nginx-body;
    proxy_temp_path {folder}/nginx-proxy;
    fastcgi_temp_path {folder}/nginx-fastcgi;
    uwsgi_temp_path {folder}/nginx-uwsgi;
    scgi_temp_path {folder}/nginx-scgi;
    include {site};
{extra_http}}}
"""
    )
    return conf


def nginx_cmd(conf: Path, folder: Path, *args: str) -> list[str]:
    return ["nginx", "-c", str(conf), "-p", str(folder), "-g", "daemon off;", *args]


# --- processes ---------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # qcluster: SIGTERM to the main process only (own_group.py stops its group in order).
    group_signal: bool = True

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                if self.group_signal:
                    os.killpg(self.popen.pid, signal.SIGTERM)
                else:
                    self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} ignored SIGTERM for {grace:g}s: SIGKILL")
        # Whatever is left in its group (workers, a stuck child) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Failed(Exception):
    """A check of the production set failed; the message says which and what was seen."""


@dataclass
class ProdStack:
    folder: Path
    database: str = field(default_factory=lambda: f"kurs_prod_{os.getpid()}")
    prefix: str = field(default_factory=lambda: f"kursprod{uuid.uuid4().hex[:8]}")
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(50))
    processes: list[Proc] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("emulator", "web1", "web2", "nginx", "static", "fetcher", "qcluster"):
            self.ports[name] = free_port()

    # -- environment --
    @property
    def database_url(self) -> str:
        return POSTGRES_URL.rsplit("/", 1)[0] + f"/{self.database}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:6379/{REDIS_DB}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.ports['nginx']}"

    def env(self, instance: str, **extra: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DJANGO_", "KURS_", "PROMETHEUS_", "PYTEST_"))
            and key not in ("DATABASE_URL", "REDIS_URL", "NATS_URL")
        }
        emulator = f"127.0.0.1:{self.ports['emulator']}"
        env.update(
            DJANGO_SETTINGS_MODULE="config.settings",
            DJANGO_DEBUG="false",
            DJANGO_SECRET_KEY=self.secret,
            DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            NATS_URL="nats://127.0.0.1:4222",
            KURS_NATS_PREFIX=self.prefix,
            KURS_INSTANCE=instance,
            KURS_LOG_FORMAT="json",
            KURS_LOG_LEVEL="INFO",
            KURS_NUM_PROXIES="1",
            KURS_POLL_INTERVAL="2",
            KURS_BINANCE_REST_URL=f"http://{emulator}/binance",
            KURS_BINANCE_WS_URL=f"ws://{emulator}/binance",
            KURS_BYBIT_REST_URL=f"http://{emulator}/bybit",
            KURS_BYBIT_WS_URL=f"ws://{emulator}/bybit",
            KURS_COINGECKO_REST_URL=f"http://{emulator}/coingecko",
            KURS_CBR_REST_URL=f"http://{emulator}/cbr",
            KURS_STATIC_ROOT=str(self.folder / "static"),
        )
        env.update(extra)
        return env

    def spawn(
        self, name: str, args: list[str], env: dict[str, str], *, group_signal: bool = True
    ) -> Proc:
        log = self.folder / f"{name}.log"
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log, group_signal)
        self.processes.append(proc)
        return proc

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env=self.env("manage"),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if result.returncode != 0:
            raise Failed(f"manage.py {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result.stdout

    # -- services --
    def create_database(self) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            db.execute(f'CREATE DATABASE "{self.database}"')

    def drop_database(self) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def flush_redis(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.flushdb()
        finally:
            client.close()

    async def drop_stream(self) -> None:
        client = await nats.connect("nats://127.0.0.1:4222")
        try:
            with contextlib.suppress(Exception):
                await client.jetstream().delete_stream(stream_name(self.prefix))
        finally:
            await client.close()

    # -- the set --
    def render_nginx(self, rate: str) -> Path:
        site = self.folder / "kurs-site.conf"
        site.write_text(
            render_template(
                NGINX_TEMPLATE.read_text(),
                {
                    "KURS_NGINX_LISTEN": f"127.0.0.1:{self.ports['nginx']}",
                    "KURS_WEB_UPSTREAM": [
                        f"127.0.0.1:{self.ports['web1']}",
                        f"127.0.0.1:{self.ports['web2']}",
                    ],
                    "KURS_NGINX_API_RATE": rate,
                    "KURS_NGINX_API_BURST": COMPOSE_BURST if rate == COMPOSE_RATE else BENCH_BURST,
                    "KURS_NGINX_CACHE_DIR": str(self.folder / "nginx-cache"),
                },
            )
        )
        # The bench's baseline: the same nginx serving /courses' bytes as a static file.
        static = (
            f"    server {{\n        listen 127.0.0.1:{self.ports['static']};\n"
            f"        access_log off;\n        root {self.folder}/www;\n"
            f'        location = {COURSES} {{ default_type "application/json; charset=utf-8"; }}\n'
            "    }\n"
        )
        return nginx_main_conf(self.folder, site, static)

    def start(self) -> float:
        """Start every process; the monotonic time they were started at."""
        (self.folder / "www" / "api" / "v1").mkdir(parents=True)
        # nginx's workers run as another user: they create and use the cache under the folder.
        self.folder.chmod(0o755)
        conf = self.render_nginx(BENCH_RATE)
        check = subprocess.run(
            nginx_cmd(conf, self.folder, "-t"), capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise Failed(f"nginx -t refused the rendered deploy/nginx.conf:\n{check.stderr}")
        qcluster_metrics = self.folder / "qcluster-metrics"
        qcluster_metrics.mkdir()
        started = time.monotonic()
        emulator = self.env("emulator")
        self.spawn(
            "emulator",
            [PYTHON, "manage.py", "run_emulator", "--port", str(self.ports["emulator"])],
            emulator,
        )
        for name in ("web1", "web2"):
            env = self.env(
                name,
                KURS_HOST="127.0.0.1",
                KURS_PORT=str(self.ports[name]),
                KURS_WEB_WORKERS="1",
            )
            self.spawn(name, [str(ROOT / "scripts" / "serve.sh")], env)
        metrics_env = {"KURS_METRICS_HOST": "127.0.0.1"}
        self.spawn(
            "qcluster",
            [PYTHON, "scripts/own_group.py", PYTHON, "manage.py", "qcluster"],
            self.env(
                "qcluster",
                **metrics_env,
                KURS_METRICS_PORT=str(self.ports["qcluster"]),
                PROMETHEUS_MULTIPROC_DIR=str(qcluster_metrics),
            ),
            group_signal=False,
        )
        self.spawn(
            "fetcher",
            [PYTHON, "manage.py", "run_fetch", "--watch"],
            self.env(
                "fetcher",
                **metrics_env,
                KURS_METRICS_PORT=str(self.ports["fetcher"]),
                # As the Procfile: the first cycle waits for the emulator to listen.
                KURS_WAIT_FOR=f"127.0.0.1:{self.ports['emulator']}",
            ),
        )
        self.spawn("nginx", nginx_cmd(conf, self.folder), dict(os.environ))
        for name in ("emulator", "web1", "web2", "nginx", "fetcher", "qcluster"):
            try:
                wait_for_port(self.ports[name], START_TIMEOUT, self.proc(name).popen)
            except TimeoutError:
                proc = self.proc(name)
                raise Failed(
                    f"{name} does not listen on {self.ports[name]}:\n{proc.tail()}"
                ) from None
        return started

    def proc(self, name: str) -> Proc:
        return next(p for p in self.processes if p.name == name)

    def stop(self) -> None:
        # nginx first (no new requests), then the writers, then what they talk to.
        order = ["nginx", "web1", "web2", "fetcher", "qcluster", "emulator"]
        for name in order:
            for proc in self.processes:
                if proc.name == name:
                    proc.stop()
        for proc in self.processes:
            proc.stop()


# --- the checks --------------------------------------------------------------------------------
def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def wait_for_first_rate(stack: ProdStack, started: float) -> float:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                response = client.get(stack.origin + COURSES)
                if response.status_code == 200 and response.json()["courses"]:
                    return time.monotonic() - started
            time.sleep(0.05)
    raise Failed(
        f"no course through nginx within {START_TIMEOUT:g}s:\n{stack.proc('fetcher').tail()}"
    )


def check_health_and_courses(stack: ProdStack) -> None:
    with httpx.Client(base_url=stack.origin, timeout=10) as client:
        deadline = time.monotonic() + 30
        while True:
            health = client.get("/api/v1/health")
            body = health.json()
            if health.status_code == 200 and body["status"] == "ok":
                break
            if time.monotonic() > deadline:
                raise Failed(f"health is not ok: {health.status_code} {body}")
            time.sleep(0.5)
        print(f"  health ok: {', '.join(sorted(body['components']))}")
        courses = client.get(COURSES)
        check(courses.status_code == 200, f"/courses: {courses.status_code} {courses.text}")
        check("etag" in courses.headers, "/courses without an ETag")
        check(courses.headers.get("x-request-id", "") != "", "no X-Request-ID through nginx")
        not_modified = client.get(COURSES, headers={"If-None-Match": courses.headers["etag"]})
        check(not_modified.status_code in (200, 304), f"/courses 304: {not_modified.status_code}")
        unknown = client.get("/api/v1/nothing-here")
        check(
            unknown.status_code == 404 and "detail" in unknown.json(),
            f"unknown /api/ path: {unknown.status_code} {unknown.text[:200]}",
        )
        dashboard = client.get("/")
        check(dashboard.status_code == 200, f"dashboard /: {dashboard.status_code}")
        admin_css = client.get("/static/admin/css/base.css")
        check(admin_css.status_code == 200, f"a collected static file: {admin_css.status_code}")
        schema = client.get("/api/v1/openapi.json", headers={"Accept-Encoding": "gzip"})
        encoding = schema.headers.get("content-encoding")
        check(encoding == "gzip", f"openapi.json not gzipped by nginx: {encoding}")
        closed = client.get("/metrics")
        check(closed.status_code == 404, f"/metrics is public through nginx: {closed.status_code}")
        print(
            f"  /courses: {len(courses.json()['courses'])} courses, ETag, X-Request-ID; "
            "dashboard, static files, gzip, JSON 404 under /api/, /metrics closed"
        )


def check_items_crud(stack: ProdStack) -> None:
    key = stack.manage("create_api_key", "test-prod").strip().splitlines()[-1]
    auth = {"X-API-Key": key}
    with httpx.Client(base_url=stack.origin, timeout=10) as client:
        denied = client.post("/api/v1/items", json={"base": "SOL", "quote": "USD"})
        check(denied.status_code == 401, f"POST without a key: {denied.status_code}")
        created = client.post("/api/v1/items", json={"base": "sol", "quote": "usd"}, headers=auth)
        check(created.status_code == 201, f"POST /items: {created.status_code} {created.text}")
        item = created.json()
        check(item["code"] == "SOL-USD", f"created {item}")
        url = f"/api/v1/items/{item['id']}"
        got = client.get(url)
        check(got.status_code == 200 and got.json()["code"] == "SOL-USD", f"GET: {got.text}")
        patched = client.patch(url, json={"name": "Solana"}, headers=auth)
        check(patched.status_code == 200 and patched.json()["name"] == "Solana", patched.text)
        deleted = client.delete(url, headers=auth)
        check(deleted.status_code == 204, f"DELETE: {deleted.status_code}")
        check(client.get(url).status_code == 404, "the deleted item is still there")
    print("  items CRUD with an API key from create_api_key (401 without)")


async def first_rate_update_ws(stack: ProdStack, within: float) -> float:
    started = time.monotonic()
    url = stack.origin.replace("http", "ws", 1) + f"/ws/items?pairs={PAIR}"
    async with ws_connect(url, open_timeout=10) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        check(first["type"] == "snapshot", f"/ws/items began with {first}")
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), within))
            if message["type"] == "rate.updated" and message["data"]["direction"] == PAIR:
                return time.monotonic() - started


async def first_rate_update_sse(stack: ProdStack, within: float) -> float:
    started = time.monotonic()
    url = stack.origin + f"/api/v1/stream?pairs={PAIR}"
    events: list[str] = []
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=within)) as client,
        client.stream("GET", url) as response,
    ):
        check(response.status_code == 200, f"stream: {response.status_code}")
        kind = response.headers.get("content-type", "")
        check(kind.startswith("text/event-stream"), f"stream type {kind}")
        encoding = response.headers.get("content-encoding")
        check(encoding is None, f"the stream is compressed ({encoding}): events would wait")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
                if events[-1] == "rate.updated":
                    check(events[0] == "snapshot", f"the stream began with {events[0]}")
                    return time.monotonic() - started
    raise Failed(f"the stream ended after {events}")


def check_realtime(stack: ProdStack) -> None:
    async def both() -> tuple[float, float]:
        ws, sse = await asyncio.gather(
            first_rate_update_ws(stack, 30), first_rate_update_sse(stack, 30)
        )
        return ws, sse

    try:
        ws, sse = asyncio.run(both())
    except TimeoutError:
        raise Failed("no rate update within 30 s on /ws/items or the stream") from None
    print(f"  rate.updated through nginx: /ws/items after {ws:.2f}s, SSE after {sse:.2f}s")


def check_provider_failover(stack: ProdStack) -> None:
    """binance down at the emulator: BTC-USD fails over, visible through nginx and in metrics."""
    control = f"http://127.0.0.1:{stack.ports['emulator']}/_control"
    fetcher_metrics = f"http://127.0.0.1:{stack.ports['fetcher']}/metrics"
    with httpx.Client(base_url=stack.origin, timeout=10) as client:
        items = client.get("/api/v1/items", params={"limit": 100}).json()["items"]
        latest = f"/api/v1/items/{next(i['id'] for i in items if i['code'] == PAIR)}/rates/latest"
        check(client.get(latest).json()["provider"] == "binance", "binance does not serve BTC-USD")
        httpx.post(f"{control}/binance", json={"mode": "down"}, timeout=5).raise_for_status()
        started = time.monotonic()
        while (body := client.get(latest).json())["status"] != "failover":
            check(time.monotonic() - started < 15, f"no failover within 15 s: {body}")
            time.sleep(0.1)
        took = time.monotonic() - started
        failed_over = f'kurs_failovers_total{{pair="{PAIR}",provider="{body["provider"]}"}}'
        check(failed_over in scrape(fetcher_metrics), f"{failed_over} not on the fetcher's port")
        httpx.post(f"{control}/reset", timeout=5).raise_for_status()
        while client.get(latest).json()["status"] != "live":
            check(time.monotonic() - started < 45, "binance did not serve again within 30 s")
            time.sleep(0.2)
    print(
        f"  binance down: BTC-USD on {body['provider']} (failover) through nginx after "
        f"{took:.1f}s, counted in kurs_failovers_total; live again after the reset"
    )


def scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    check(response.status_code == 200, f"{url}: {response.status_code}")
    return response.text


def promtool_check(name: str, text: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    problems = (result.stdout + result.stderr).strip()
    check(result.returncode == 0 and not problems, f"promtool check metrics ({name}):\n{problems}")


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_names(text: str) -> set[str]:
    """Every series name a scrape declares (`# TYPE`), observed yet or not."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in _SUFFIXES.get(family.type, ("",))
    }


def dashboard_metrics() -> set[str]:
    exprs = [
        target["expr"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel.get("targets", [])
    ]
    return {name for expr in exprs for name in re.findall(r"\bkurs_[a-z0-9_]+", expr)}


def check_courses_cache(stack: ProdStack) -> None:
    """nginx keeps /courses by its query string, answers a repeat from the cache, never an
    error (docs/operations.md#caches-in-front)."""
    url = stack.origin + COURSES
    with httpx.Client(timeout=5) as client:
        client.get(url + "?direction=" + PAIR)
        again = client.get(url + "?direction=" + PAIR)
        check(again.status_code == 200, f"/courses?direction={PAIR}: {again.status_code}")
        check(
            again.headers.get("x-cache-status") in ("HIT", "UPDATING", "STALE"),
            f"a repeated /courses was not served from nginx's cache: {dict(again.headers)}",
        )
        check("stale-if-error" in again.headers.get("cache-control", ""), "no stale-if-error")
        for _ in range(2):
            refused = client.get(url + "?direction=NOT-A-PAIR")
            check(refused.status_code == 422, f"/courses of an unknown pair: {refused.status_code}")
            check(
                refused.headers.get("x-cache-status") == "MISS",
                f"an error came from nginx's cache: {dict(refused.headers)}",
            )


def check_metrics(stack: ProdStack) -> None:
    scraped = {
        "web1": scrape(f"http://127.0.0.1:{stack.ports['web1']}/metrics"),
        "web2": scrape(f"http://127.0.0.1:{stack.ports['web2']}/metrics"),
        "fetcher": scrape(f"http://127.0.0.1:{stack.ports['fetcher']}/metrics"),
        "qcluster": scrape(f"http://127.0.0.1:{stack.ports['qcluster']}/metrics"),
    }
    for name, text in scraped.items():
        promtool_check(name, text)
    fetcher = scraped["fetcher"]
    for needed in ("kurs_quotes_accepted_total", "kurs_circuit_state", "kurs_rate_status"):
        check(f"\n{needed}{{" in fetcher, f"the fetcher's port lacks {needed}:\n{fetcher[:2000]}")
    web = scraped["web1"] + scraped["web2"]
    check('kurs_http_requests_total{method="GET"' in web, "no HTTP request counted on web")
    exported = set().union(*(exported_names(text) for text in scraped.values()))
    missing = dashboard_metrics() - exported
    check(not missing, f"the Grafana dashboard names metrics nobody exports: {sorted(missing)}")
    print(
        f"  metrics: web x2 /metrics, fetcher :{stack.ports['fetcher']}, qcluster "
        f":{stack.ports['qcluster']}: promtool clean, every dashboard metric exported"
    )


def check_json_logs(stack: ProdStack) -> None:
    for name in ("web1", "web2", "fetcher", "qcluster"):
        lines = [line for line in stack.proc(name).log.read_text().splitlines() if line.strip()]
        check(bool(lines), f"{name} logged nothing")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                raise Failed(f"{name} logged a line that is not JSON: {line[:300]}") from None
            check(
                isinstance(record, dict) and str(record.get("ts", "")).endswith("Z"),
                f"{name}: a JSON log line without an ISO-8601 UTC ts: {line[:300]}",
            )
    print("  logs of web x2, fetcher, qcluster: one JSON object per line, ISO-8601 UTC ts")


# --- load ----------------------------------------------------------------------------------------
def wrk(url: str, seconds: float = 3.0, connections: int = 64) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    check("Non-2xx or 3xx responses" not in out, f"wrk saw errors on {url}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise Failed(f"wrk said:\n{out}")
    return float(match.group(1))


def bench_courses(stack: ProdStack, repeats: int = 3) -> tuple[float, float]:
    """Median req/s of /courses through nginx (two web processes) and of its static copy."""
    body = httpx.get(stack.origin + COURSES, timeout=5).content
    static = stack.folder / "www" / "api" / "v1" / "courses"
    static.write_bytes(body)
    for path in [stack.folder, *stack.folder.joinpath("www").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    static_url = f"http://127.0.0.1:{stack.ports['static']}{COURSES}"
    check(httpx.get(static_url, timeout=5).content == body, "the static copy differs")
    proxied, baseline = [], []
    wrk(stack.origin + COURSES, 1.0)  # warm both web processes' snapshots and connections
    for _ in range(repeats):  # in turns, so the machine's other load spreads over both
        proxied.append(wrk(stack.origin + COURSES))
        baseline.append(wrk(static_url))
    return sorted(proxied)[repeats // 2], sorted(baseline)[repeats // 2]


def nginx_workers(master: int) -> set[int]:
    """The worker processes of nginx's master (children by their parent pid in /proc)."""
    workers = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == master:
                workers.add(int(stat.parent.name))
    return workers


def reload_nginx(stack: ProdStack, conf: Path, rate: str) -> None:
    """Re-render with `rate` and reload; return once new workers (the new config) accept."""
    stack.render_nginx(rate)
    master = stack.proc("nginx").popen.pid
    before = nginx_workers(master)
    reload = subprocess.run(
        ["nginx", "-c", str(conf), "-p", str(stack.folder), "-s", "reload"],
        capture_output=True,
        text=True,
        check=False,
    )
    check(reload.returncode == 0, f"nginx -s reload: {reload.stderr}")
    deadline = time.monotonic() + 10
    # The new workers (worker_processes 2) take over, and the old ones must be gone too: one that
    # has not yet heard of its shutdown can still accept a connection, then close it after one
    # request (a keep-alive client sees a reset on its second).
    while True:
        workers = nginx_workers(master)
        if len(workers - before) >= 2 and not workers & before:
            return
        check(time.monotonic() < deadline, f"nginx workers after the reload: {workers} ({before})")
        time.sleep(0.02)


def check_rate_limit(stack: ProdStack, conf: Path) -> None:
    """Reload nginx with compose's rate; a burst beyond it answers 429."""
    reload_nginx(stack, conf, COMPOSE_RATE)

    async def burst() -> list[int]:
        # 16 clients at once: far above 50 r/s even on a loaded machine.
        async with httpx.AsyncClient(timeout=10) as client:

            async def some(count: int) -> list[int]:
                return [
                    (await client.get(stack.origin + COURSES)).status_code for _ in range(count)
                ]

            batches = await asyncio.gather(*(some(25) for _ in range(16)))
        return [status for batch in batches for status in batch]

    statuses = asyncio.run(burst())
    limited = statuses.count(429)
    check(limited > 0, f"no 429 from 400 quick requests at {COMPOSE_RATE}")
    check(statuses.count(200) + statuses.count(304) >= 100, f"the burst was refused: {statuses}")
    print(f"  nginx limit {COMPOSE_RATE} (burst 100): {limited} of 400 quick requests got 429")
    reload_nginx(stack, conf, BENCH_RATE)


def check_failover_of_web(stack: ProdStack) -> None:
    """SIGKILL web1 under load: nginx retries every request web1 had not begun to answer."""

    # Not /courses: nginx answers most of it from its cache, and might never ask web1.
    url = stack.origin + "/api/v1/providers"

    async def load(stop: asyncio.Event, statuses: list[int | str]) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not stop.is_set():
                try:
                    statuses.append((await client.get(url)).status_code)
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)

    async def run() -> tuple[list[int | str], int, int]:
        stop = asyncio.Event()
        statuses: list[int | str] = []
        tasks = [asyncio.create_task(load(stop, statuses)) for _ in range(8)]
        await asyncio.sleep(1.0)
        before = len(statuses)
        await asyncio.to_thread(stack.proc("web1").kill)
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*tasks)
        return statuses, before, len(statuses) - before

    statuses, before, after = asyncio.run(run())
    failed = [status for status in statuses if status != 200]
    check(after > 50, f"only {after} requests after the kill")
    # A request whose answer web1 had begun to send when it died cannot be retried: nginx has
    # passed the headers on ("upstream prematurely closed connection while reading upstream")
    # and can only cut the client's connection. At most one per client in flight (8); every
    # other request, queued or not yet answered, must go to web2. Seen once in about ten runs.
    cut = (stack.folder / "nginx-error.log").read_text().count("prematurely closed connection")
    check(
        all(status in ("RemoteProtocolError", "ReadError") for status in failed)
        and len(failed) <= min(cut, 8),
        f"{len(failed)} failed requests while web1 died ({cut} cut mid-answer): {failed[:10]}",
    )
    errors = (stack.folder / "nginx-error.log").read_text()
    check("connect() failed" in errors or "upstream" in errors, "nginx never saw web1 fail")
    print(
        f"  web1 SIGKILLed under load: {before} requests before, {after} after, "
        f"{after - len(failed)} of them 200 (nginx retried on web2), {len(failed)} cut mid-answer"
    )


# --- main ----------------------------------------------------------------------------------------
def unavailable() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install nginx-light prometheus wrk)"
    for service, port in (("PostgreSQL", 5432), ("Redis", 6379), ("NATS", 4222)):
        if not port_open("127.0.0.1", port):
            return f"{service} is not reachable on 127.0.0.1:{port}"
    return None


def refused(run: str, reason: str | None) -> int | None:
    """Before a stack's run (`test-prod`, `test-cluster`): the exit code when something it needs
    is missing (`reason`): a skip, or a failure under CI=true; else None, and from then on a
    SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: the processes started are stopped."""
    if reason:
        if in_ci():
            print(f"{run}: FAILED: {reason} (CI=true)")
            return 1
        print(f"{run}: SKIPPED: {reason}")
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"{run}: signal {signum}"))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs folder")
    args = parser.parse_args(argv)
    code = refused("test-prod", unavailable())
    if code is not None:
        return code
    began = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="kurs-prod-"))
    stack = ProdStack(folder)
    ok = False
    try:
        print(f"test-prod: database {stack.database}, Redis db {REDIS_DB}, NATS {stack.prefix}")
        stack.create_database()
        stack.flush_redis()
        stack.manage("migrate", "--no-input", "-v", "0")
        stack.manage("collectstatic", "--no-input", "-v", "0")
        started = stack.start()
        first_rate = wait_for_first_rate(stack, started)
        print(
            f"  started: nginx :{stack.ports['nginx']} -> web :{stack.ports['web1']}, "
            f":{stack.ports['web2']}; qcluster; fetcher on the emulator"
        )
        check_health_and_courses(stack)
        check_items_crud(stack)
        check_realtime(stack)
        check_provider_failover(stack)
        check_metrics(stack)
        check_courses_cache(stack)
        conf = folder / "nginx-main.conf"
        proxied, static = bench_courses(stack)
        check_rate_limit(stack, conf)
        check_failover_of_web(stack)
        check_json_logs(stack)
        ok = True
        print(
            f"/courses through nginx (cached), 2 web processes: {proxied:,.0f} req/s; "
            "nginx static file, "
            f"same bytes: {static:,.0f} req/s; ratio {proxied / static:.2f}x "
            "(wrk -t1 -c64, median of 3 x 3 s; provisional on a shared machine)"
        )
        print(
            f"start to first rate (processes launched -> a course through nginx): {first_rate:.2f}s"
        )
    except Failed as exc:
        print(f"test-prod: FAILED: {exc}")
        for proc in stack.processes:
            print(f"--- {proc.name} ({proc.log.name}), last lines:\n{proc.tail(15)}")
    finally:
        stack.stop()
        with contextlib.suppress(Exception):
            stack.drop_database()
        with contextlib.suppress(Exception):
            stack.flush_redis()
        with contextlib.suppress(Exception):
            asyncio.run(stack.drop_stream())
        if ok and not args.keep_logs:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"logs: {folder}")
    print(f"test-prod: {'passed' if ok else 'FAILED'} in {time.monotonic() - began:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
