"""The Python cost of one answer through the edge, in-process, without a server or a socket.

    .venv/bin/python bench/bench_edge_inprocess.py [--path /api/v1/courses] [--log-level INFO]
        [--plain-metrics] [-n 20000]

A temporary SQLite database, migrated, with the seeded pairs; the snapshot loaded; then `-n`
requests handed to `config.asgi.http_app` one after another, best of five rounds of the CPU time
the process used (not the wall clock: other work on the machine is not counted). The access log
goes to /dev/null through its configured handler. `--plain-metrics` counts each request with
plain `labels().inc()` / `labels().observe()` instead of `RequestTally` (the measurement behind
keeping `edge/promclient.py`). On a machine shared with other work, compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="/api/v1/courses")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--plain-metrics", action="store_true")
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="kurs-bench-edge-")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_SECRET_KEY="kurs-bench-secret-key-not-for-production-0123456789",
        DATABASE_URL=f"sqlite:///{tmp}/bench.sqlite3",
        KURS_LOG_LEVEL=args.log_level,
        KURS_SHARED_CACHE_DIR=f"{tmp}/cache",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from config.asgi import http_app
    from rates.snapshot import snapshot

    for handler in logging.getLogger("kurs.access").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
    snapshot.load()
    if args.plain_metrics:
        from edge.metrics import HTTP_LATENCY, HTTP_REQUESTS

        class Plain:
            def observe(self, method: str, route: str, status: int, seconds: float) -> None:
                HTTP_REQUESTS.labels(method, route, str(status)).inc()
                HTTP_LATENCY.labels(method, route).observe(seconds)

        # The plain-metrics stand-in has the tally's one method, observe().
        http_app.tally = Plain()  # type: ignore[assignment]
    print(f"{args.path}: {asyncio.run(run(http_app, args.path, args.n)):.2f} us per request")


async def run(app: Any, path: str, n: int) -> float:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise SystemExit(f"{path} answered {sent[0]['status']}")
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(n):
            await app(scope, receive, send)
            sent.clear()
        best = min(best, (time.process_time() - started) / n * 1e6)
    return best


if __name__ == "__main__":
    main()
