"""`GET /metrics` (Prometheus text) and the HTTP request metrics.

Each process keeps its own metrics (the fetcher counts quotes, the web process requests and
sockets). When `PROMETHEUS_MULTIPROC_DIR` is set (`make run` sets it for all its processes),
`/metrics` aggregates every process's files, so one scrape sees the whole service; otherwise it
exports this process's registry. The files are named by pid: the directory belongs to the
processes of one host (one pid namespace), never to a volume shared between containers.

Files of processes that are gone must not count. Gauges aggregate live processes only
(`livesum`, `livemax`, `livemin`), and a process is forgotten (`mark_process_dead`: its live
gauges go) when it exits normally (`mark_dead_at_exit`, from `realtime.apps`) and, for those that
die by a signal (uvicorn's workers re-raise SIGTERM; SIGKILL), at the next scrape, which looks for
the pids that no longer exist. Counters and histograms of a dead process stay, as totals should.
`scripts/start.sh` empties the directory before the processes start.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
from collections.abc import Iterable

from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    generate_latest,
    multiprocess,
)

from edge.promclient import observe_many

HTTP_REQUESTS = Counter(
    "kurs_http_requests_total",
    "HTTP requests by method, route and status.",
    ["method", "route", "status"],
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
HTTP_LATENCY = Histogram(
    "kurs_http_request_seconds",
    "HTTP request latency by method and route.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)


# How long a request may wait to be counted (RequestTally).
TALLY_FLUSH_S = 0.5


class RequestTally:
    """Requests counted in plain numbers, added to the HTTP metrics in bulk (`edge.layer`'s).

    A fast-path answer takes a few microseconds of Python; three locked increments per request
    (the counter, the histogram's sum and bucket) were a third of them (cProfile, `/courses`).
    Here a request costs a dict update and a list append, and every `TALLY_FLUSH_S` (sooner on
    `flush()`: before a scrape of this process, and at exit) the totals go to `HTTP_REQUESTS`
    and `HTTP_LATENCY` in one increment per label set and bucket: the same series, the same
    bucket rule as `Histogram.observe` (a value goes to the first bound it does not exceed).
    """

    def __init__(self, flush_after: float = TALLY_FLUSH_S) -> None:
        self._flush_after = flush_after
        self._counts: dict[tuple[str, str, int], int] = {}
        self._seconds: dict[tuple[str, str], list[float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        atexit.register(self.flush)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        latencies = self._seconds.get(key[:2])
        if latencies is None:
            latencies = self._seconds[key[:2]] = []
        latencies.append(seconds)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_after, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        seconds, self._seconds = self._seconds, {}
        for (method, route, status), n in counts.items():
            HTTP_REQUESTS.labels(method, route, str(status)).inc(n)
        for (method, route), values in seconds.items():
            observe_many(HTTP_LATENCY.labels(method, route), values)


request_tally = RequestTally()


def mark_dead_at_exit() -> None:
    """With PROMETHEUS_MULTIPROC_DIR, this process's live gauges go when it exits."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        atexit.register(multiprocess.mark_process_dead, os.getpid())


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def forget_dead_processes(directory: str) -> list[int]:
    """Mark dead every process with live-gauge files here that no longer runs; their pids."""
    names = (_LIVE_GAUGE_FILE.match(name) for name in os.listdir(directory))
    pids = {int(match.group(1)) for match in names if match}
    dead = [pid for pid in sorted(pids) if not _alive(pid)]
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


# MultiProcessCollector is unannotated; pyproject's `untyped_calls_exclude` for its module does
# not reach calls through `super()`, hence the two ignores below.
class LiveProcessesCollector(multiprocess.MultiProcessCollector):
    """The sum of every process's files, the dead ones' live gauges forgotten first."""

    def __init__(self, registry: CollectorRegistry, directory: str) -> None:
        super().__init__(registry, path=directory)  # type: ignore[no-untyped-call]  # see above
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        forget_dead_processes(self.directory)
        metrics: Iterable[Metric] = super().collect()  # type: ignore[no-untyped-call]  # see above
        return metrics


def scrape_registry() -> CollectorRegistry:
    """This process's registry, or the sum of the live processes in the multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    LiveProcessesCollector(registry, directory)
    return registry


def metrics_view(request: HttpRequest) -> HttpResponse:
    request_tally.flush()  # this process's requests, counted up to now
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)
