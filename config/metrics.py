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

import atexit
import os
import re
import time
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

from config.middleware import HybridMiddleware

HTTP_REQUESTS = Counter(
    "kurs_http_requests_total",
    "HTTP requests by method, route and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "kurs_http_request_seconds",
    "HTTP request latency by method and route.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def _route(request: HttpRequest) -> str:
    # The URL pattern, not the path, keeps label values bounded (/api/v1/items/<id>, not ids).
    match = getattr(request, "resolver_match", None)
    return match.route if match is not None and match.route else "unmatched"


class HttpMetricsMiddleware(HybridMiddleware):
    def before(self, request: HttpRequest) -> float:
        return time.perf_counter()

    def after(self, request: HttpRequest, response: HttpResponse, state: float) -> HttpResponse:
        self._observe(request, response, state)
        return response

    @staticmethod
    def _observe(request: HttpRequest, response: HttpResponse, started: float) -> None:
        route = _route(request)
        method = request.method or "?"
        HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
        HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)


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


class LiveProcessesCollector(multiprocess.MultiProcessCollector):
    """The sum of every process's files, the dead ones' live gauges forgotten first."""

    def collect(self) -> Iterable[Metric]:
        forget_dead_processes(self._path)
        return super().collect()


def scrape_registry() -> CollectorRegistry:
    """This process's registry, or the sum of the live processes in the multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    LiveProcessesCollector(registry, path=directory)
    return registry


def metrics_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)
