"""A realistic load on Kurs's read side; `make loadtest` runs it headless (bench/loadtest.py).

    .venv/bin/locust -f bench/locustfile.py --host http://127.0.0.1:8000   # web UI on :8089
    .venv/bin/locust -f bench/locustfile.py --list                          # the user classes

Two kinds of users:

- `ApiUser` (every user but the socket clients): an app polling the read API, mostly
  `GET /api/v1/courses` as a dashboard does (its `max-age` is 1 s), most often revalidating with
  the last `ETag` it got (a 304 when nothing moved); then the current rate of tracked pairs
  (BTC/USD, ETH/RUB, served from the snapshot) and of untracked ones (SOL/USDT fetched on
  demand, EUR/GBP derived through RUB: both from the 5 s on-demand cache), conversions by GET and
  POST, and item detail.
- `SocketUser` (`LOADTEST_WS_CLIENTS`, default 10, a fixed count): clients of `/ws/items` that
  stay connected for the whole run, half following every pair and half BTC-USD and ETH-RUB, and
  ping every 5 s. In the stats, request type `WS`: `connect` (handshake to snapshot, ms), `ping`
  (round trip of `{"action": "ping"}` to its `pong`, ms), one row per received message type
  (`recv rate.updated`, ...: counted, no response time, so they leave the percentiles to the
  requests) and `connection lost` (a failure) when the server closed a socket during the run.

Locust runs on gevent (it monkey-patches the standard library when imported), so the socket
client is websocket-client, a blocking client whose sockets gevent makes cooperative. No `Origin`
header is sent: a server-side client is accepted without one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from decimal import Decimal
from typing import Any, ClassVar

import gevent
import gevent.lock
import websocket
from locust import FastHttpUser, User, between, constant, events, task
from locust.env import Environment
from locust.stats import StatsEntry

log = logging.getLogger("kurs.loadtest")

COURSES = "/api/v1/courses"
TRACKED_PAIRS = (("BTC", "USD"), ("ETH", "RUB"))
# SOL/USDT is listed by the exchanges (a direct on-demand quote); EUR/GBP nobody lists, so it is
# derived through RUB from the Bank of Russia's table (two legs, `derived: true`).
UNTRACKED_PAIRS = (("SOL", "USDT"), ("EUR", "GBP"))
CONVERSIONS = (("BTC", "RUB"), ("ETH", "USD"), ("USDTTRC", "RUB"), ("BTC", "USD"))
WS_PAIRS = "BTC-USD,ETH-RUB"
HTTP_METHODS = frozenset({"GET", "POST"})


def _amount() -> str:
    # A plain decimal string with up to 8 places, as a wallet would send it.
    return str(Decimal(random.randint(1, 10**9)) / Decimal(10**8))


class ApiUser(FastHttpUser):
    """A client of the REST read API: mostly `/courses`, with and without `If-None-Match`."""

    # A polling client: about two requests a second per user, with a little jitter.
    wait_time = between(0.2, 0.8)
    # Item ids are looked up once per locust process (the first user to start does it).
    item_ids: ClassVar[list[int]] = []
    item_ids_lock: ClassVar[gevent.lock.Semaphore] = gevent.lock.Semaphore()
    # Set when the server answers 404 for /courses (a build without it): its tasks then pass.
    courses_missing: ClassVar[bool] = False

    def on_start(self) -> None:
        self.etags: dict[str, str] = {}
        with ApiUser.item_ids_lock:  # the other users starting meanwhile wait for the first
            if not ApiUser.item_ids:
                self._load_item_ids()

    def _load_item_ids(self) -> None:
        with self.client.get(
            "/api/v1/items?is_active=true&limit=500",
            name="/api/v1/items (on start)",
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                ApiUser.item_ids = [item["id"] for item in response.json()["items"]]
                response.success()
            else:
                response.failure(f"items list: HTTP {response.status_code}")

    def _courses(self, query: str, name: str, *, revalidate: bool) -> None:
        if ApiUser.courses_missing:
            return
        url = COURSES + query
        headers = {}
        if revalidate and url in self.etags:
            headers["If-None-Match"] = self.etags[url]
        with self.client.get(url, headers=headers, name=name, catch_response=True) as response:
            if response.status_code == 404:
                ApiUser.courses_missing = True
                log.warning("GET %s answers 404: this server has no /courses; skipping it", url)
                response.success()
            elif response.status_code == 200:
                self.etags[url] = response.headers.get("ETag", "")
                response.success()
            elif response.status_code == 304 and "If-None-Match" in headers:
                # Its own row, so the share of revalidations that saved the body shows.
                response.request_meta["name"] = f"{name} 304"
                response.success()
            else:
                response.failure(f"HTTP {response.status_code}")

    @task(30)
    def courses_revalidated(self) -> None:
        self._courses("", f"{COURSES} (If-None-Match)", revalidate=True)

    @task(15)
    def courses(self) -> None:
        self._courses("", COURSES, revalidate=False)

    @task(10)
    def courses_filtered(self) -> None:
        self._courses(
            f"?direction={WS_PAIRS}", f"{COURSES}?direction=… (If-None-Match)", revalidate=True
        )

    @task(5)
    def courses_one_exchanger(self) -> None:
        self._courses("?exchanger=binance", f"{COURSES}?exchanger=binance", revalidate=False)

    def _rate(self, base: str, quote: str) -> None:
        path = f"/api/v1/rates/{base}/{quote}"
        with self.client.get(path, name=path, catch_response=True) as response:
            if response.status_code == 200 and response.json().get("pair") == f"{base}-{quote}":
                response.success()
            else:
                response.failure(f"HTTP {response.status_code}")

    @task(10)
    def rate_tracked(self) -> None:
        self._rate(*random.choice(TRACKED_PAIRS))

    @task(4)
    def rate_untracked(self) -> None:
        self._rate(*random.choice(UNTRACKED_PAIRS))

    @task(5)
    def convert_get(self) -> None:
        source, target = random.choice(CONVERSIONS)
        self.client.get(
            f"/api/v1/convert?from={source}&to={target}&amount={_amount()}",
            name="/api/v1/convert",
        )

    @task(3)
    def convert_post(self) -> None:
        source, target = random.choice(CONVERSIONS)
        self.client.post(
            "/api/v1/convert",
            json={"from": source, "to": target, "amount": _amount()},
            name="/api/v1/convert",
        )

    @task(8)
    def item_detail(self) -> None:
        if ApiUser.item_ids:
            item_id = random.choice(ApiUser.item_ids)
            self.client.get(f"/api/v1/items/{item_id}", name="/api/v1/items/[id]")


class SocketUser(User):
    """A `/ws/items` client that stays connected, counts what it receives and pings."""

    fixed_count = int(os.environ.get("LOADTEST_WS_CLIENTS", "10"))
    # The task only pings (and reconnects a lost socket); messages arrive on their own greenlet.
    wait_time = constant(5)
    connect_timeout = 10.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.socket: websocket.WebSocket | None = None
        self.receiver: gevent.Greenlet[[websocket.WebSocket], None] | None = None
        self.ping_sent_at: float | None = None
        self.stopping = False
        self.pairs = None if random.random() < 0.5 else WS_PAIRS

    def _fire(
        self,
        name: str,
        response_time: float | None,
        length: int = 0,
        exception: Exception | None = None,
    ) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context={},
        )

    def _url(self) -> str:
        url = (self.host or "").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        url = url.rstrip("/") + "/ws/items"
        return f"{url}?pairs={self.pairs}" if self.pairs else url

    def connect(self) -> None:
        started = time.perf_counter()
        try:
            socket = websocket.create_connection(self._url(), timeout=self.connect_timeout)
            first = socket.recv()
            if json.loads(first).get("type") != "snapshot":
                raise ValueError(f"first frame is not the snapshot: {first[:200]!r}")
        except Exception as error:  # any handshake failure is the measured failure
            self._fire("connect", (time.perf_counter() - started) * 1000, exception=error)
            return
        self._fire("connect", (time.perf_counter() - started) * 1000, len(first))
        self._fire("recv snapshot", None, len(first))
        socket.settimeout(None)  # events can be far apart; a tick comes every 30 s anyway
        self.socket = socket
        self.receiver = gevent.spawn(self._receive, socket)

    def _receive(self, socket: websocket.WebSocket) -> None:
        while True:
            try:
                frame = socket.recv()
            except Exception as error:  # closed by us, by the server, or reset
                if not self.stopping:
                    self._fire("connection lost", None, exception=error)
                    self.socket = None
                return
            if not frame:  # a close frame from the server
                if not self.stopping:
                    self._fire("connection lost", None, exception=ConnectionError("closed"))
                    self.socket = None
                return
            kind = _frame_type(frame)
            if kind == "pong" and self.ping_sent_at is not None:
                self._fire("ping", (time.perf_counter() - self.ping_sent_at) * 1000, len(frame))
                self.ping_sent_at = None
            else:
                self._fire(f"recv {kind}", None, len(frame))

    def on_start(self) -> None:
        self.connect()

    @task
    def ping(self) -> None:
        if self.socket is None:
            self.connect()
            return
        self.ping_sent_at = time.perf_counter()
        try:
            self.socket.send('{"action": "ping"}')
        except Exception as error:  # the receiver reports the lost socket
            self.ping_sent_at = None
            log.debug("ping not sent: %s", error)

    def on_stop(self) -> None:
        self.stopping = True
        if self.socket is not None:
            self.socket.close()
        if self.receiver is not None:
            self.receiver.kill(block=False)


def _frame_type(frame: str | bytes) -> str:
    try:
        kind = json.loads(frame).get("type")
    except (ValueError, AttributeError):
        return "unparsable"
    return kind if isinstance(kind, str) else "untyped"


def http_total(environment: Environment) -> StatsEntry:
    """Every HTTP request merged into one entry: locust's `Aggregated` also counts WS frames."""
    total = StatsEntry(environment.stats, "HTTP total", "")
    for entry in environment.stats.entries.values():
        if entry.method in HTTP_METHODS:
            total.extend(entry)
    return total


@events.quitting.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook is untyped
def _write_http_total(environment: Environment, **_: Any) -> None:
    # bench/loadtest.py reads `<csv prefix>_http_total.json` for the README's "total" row.
    options = environment.parsed_options
    prefix = getattr(options, "csv_prefix", None) if options else None
    if not prefix:
        return
    total = http_total(environment)
    summary = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "rps": total.total_rps,
        "p50": total.get_response_time_percentile(0.50),
        "p95": total.get_response_time_percentile(0.95),
        "p99": total.get_response_time_percentile(0.99),
        "max": total.max_response_time,
        "courses_missing": ApiUser.courses_missing,
    }
    with open(f"{prefix}_http_total.json", "w", encoding="utf-8") as out:
        json.dump(summary, out, indent=2)
