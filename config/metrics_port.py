"""Prometheus metrics of the processes that serve no HTTP: the fetcher and the qcluster.

Web processes answer `GET /metrics` (`edge.metrics`). `run_fetch --watch` and `qcluster` have no
web server, yet the quote, circuit and rate-age metrics live in the fetcher (and the safety net's
cycles in qcluster's workers); with `KURS_METRICS_PORT` set they serve the same text on that port
(on `KURS_METRICS_HOST`, 127.0.0.1 by default; compose uses 0.0.0.0 and Prometheus scrapes them).

What is served is the scrape of this process, or of every process writing to
`PROMETHEUS_MULTIPROC_DIR` when that is set: qcluster runs its tasks in forked worker processes,
so compose gives it a directory of its own and the cluster's main process sums its workers.
"""

from __future__ import annotations

import logging

from django.conf import settings
from prometheus_client import start_http_server

from edge.metrics import scrape_registry

logger = logging.getLogger(__name__)


def serve_metrics_port(process: str) -> int | None:
    """Serve `/metrics` on KURS_METRICS_PORT in a daemon thread; the port, or None when unset.

    A port already taken stops start-up with one line (a silent metrics gap is worse).
    """
    port = settings.KURS_METRICS_PORT
    if port is None:
        return None
    host = settings.KURS_METRICS_HOST
    try:
        start_http_server(port, addr=host, registry=scrape_registry())
    except OSError as exc:
        raise SystemExit(f"KURS_METRICS_PORT: cannot listen on {host}:{port}: {exc}") from None
    logger.info("%s: Prometheus metrics on http://%s:%d/metrics", process, host, port)
    return port
