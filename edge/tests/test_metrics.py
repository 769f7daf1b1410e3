from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.tests.asgi import call
from tests.services import ROOT, run_python

pytestmark = pytest.mark.django_db


async def test_metrics_count_requests_by_route() -> None:
    assert (await call("/api/v1/items")).status == 200
    response = await call("/metrics")
    assert response.status == 200
    assert (response.header("Content-Type") or b"").startswith(b"text/plain")
    text = response.body.decode()
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("kurs_http_requests_total{")
        and 'route="api/v1/items"' in line
        and 'status="200"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert "kurs_http_request_seconds_bucket" in text


AGGREGATE = """
import os, django
django.setup()
from prometheus_client import Counter
from django.test import Client
Counter("kurs_probe_total", "probe").inc(3)
print(Client(HTTP_HOST="localhost").get("/metrics").content.decode())
"""


def test_metrics_aggregate_processes_sharing_a_directory(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.test_settings",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    runs = [run_python(["-c", AGGREGATE], environment) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr
    # The second process sees both processes' increments.
    assert "kurs_probe_total 6.0" in runs[-1].stdout


SOCKETS = """
import django
django.setup()
from django.test import Client
from realtime.metrics import WS_CONNECTIONS
WS_CONNECTIONS.set({sockets})
print(Client(HTTP_HOST="localhost").get("/metrics").content.decode())
"""


def test_a_process_that_exits_takes_its_gauge_along(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.test_settings",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    gone = run_python(["-c", SOCKETS.format(sockets=5)], environment)
    assert gone.returncode == 0, gone.stderr
    assert "kurs_ws_connections 5.0" in gone.stdout  # while it lived, it counted
    live = run_python(["-c", SOCKETS.format(sockets=2)], environment)
    assert live.returncode == 0, live.stderr
    lines = [line for line in live.stdout.splitlines() if line.startswith("kurs_ws_connections")]
    # One series, the live process's sockets: not one per pid ever seen, the dead one's 5 gone.
    assert lines == ["kurs_ws_connections 2.0"]


KILLED = """
import sys, django
django.setup()
from realtime.metrics import WS_CONNECTIONS
WS_CONNECTIONS.set(7)
print("set", flush=True)
sys.stdin.read()
"""


def test_a_killed_processs_gauge_leaves_at_the_next_scrape(tmp_path: Path) -> None:
    # SIGKILL (and uvicorn's workers, which re-raise SIGTERM) run no exit handler.
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.test_settings",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    victim = subprocess.Popen(
        [sys.executable, "-c", KILLED],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "set"
        both = run_python(["-c", SOCKETS.format(sockets=2)], environment)
        assert "kurs_ws_connections 9.0" in both.stdout  # alive, it counts
    finally:
        victim.kill()
        victim.wait(10)
    after = run_python(["-c", SOCKETS.format(sockets=2)], environment)
    assert after.returncode == 0, after.stderr
    lines = [line for line in after.stdout.splitlines() if line.startswith("kurs_ws_connections")]
    assert lines == ["kurs_ws_connections 2.0"]
    assert not list(tmp_path.glob(f"gauge_live*_{victim.pid}.db"))


# --- the request tally -----------------------------------------------------------------------
def _samples(name: str, labels: dict[str, str]) -> dict[str, float]:
    """The `name` series with these labels: {suffix + le: value} from this process's registry."""
    from prometheus_client import REGISTRY

    found: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.startswith(name) and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                found[sample.name[len(name) :] + sample.labels.get("le", "")] = sample.value
    return found


@pytest.mark.django_db(False)
async def test_the_tally_adds_what_observe_would_within_its_flush_interval() -> None:
    import asyncio

    from prometheus_client import CollectorRegistry, Histogram

    from edge.metrics import LATENCY_BUCKETS, RequestTally

    labels = {"method": "GET", "route": "tally-test"}
    # On the bounds and between them, below the first and above the last.
    values = [0.0, 0.001, 0.0011, 0.0025, 0.004, 0.05, 0.7, 2.5, 3.0, 9.0, 0.001]
    reference = Histogram(
        "ref_seconds", "reference", ["method", "route"], buckets=LATENCY_BUCKETS,
        registry=CollectorRegistry(),
    )  # fmt: skip
    tally = RequestTally(flush_after=0.2)
    flushed = asyncio.Event()
    flush = tally.flush

    def flush_and_tell() -> None:
        flush()
        flushed.set()

    tally.flush = flush_and_tell  # type: ignore[method-assign]  # to hear the timer flush
    loop = asyncio.get_running_loop()
    started = loop.time()
    before = _samples("kurs_http_request", labels)
    for value in values:
        tally.observe("GET", "tally-test", 200, value)
        reference.labels("GET", "tally-test").observe(value)
    assert _samples("kurs_http_request", labels) == before  # not yet: within the interval
    await asyncio.wait_for(flushed.wait(), 5)  # the tally's own timer
    assert loop.time() - started >= 0.19
    assert _samples("kurs_http_requests_total", {**labels, "status": "200"}) == {"": 11.0}
    got = _samples("kurs_http_request_seconds", labels)
    want = {
        key: value
        for sample in next(iter(reference.collect())).samples
        for key, value in [
            (sample.name[len("ref_seconds") :] + sample.labels.get("le", ""), sample.value)
        ]
        if not key.startswith("_created")
    }
    assert {k: v for k, v in got.items() if not k.startswith("_created")} == pytest.approx(want)
    assert want["_bucket+Inf"] == 11  # the reference counted all
    assert want["_bucket0.001"] == 3


def test_the_prometheus_adapter_was_written_against_the_installed_version() -> None:
    """edge/promclient.py reads private names: an upgrade must be checked, then pinned here."""
    from importlib.metadata import version

    from prometheus_client import CollectorRegistry, Histogram

    from edge import promclient

    assert version("prometheus_client") == promclient.WRITTEN_AGAINST
    child = Histogram("adapter_seconds", "probe", ["x"], registry=CollectorRegistry()).labels("a")
    assert all(hasattr(child, name) for name in promclient.PRIVATE_NAMES)
