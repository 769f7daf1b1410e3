"""The metrics port (KURS_METRICS_PORT) of `run_fetch --watch` and `qcluster`: what Prometheus
scrapes from the processes that serve no HTTP.

A real fetcher on the emulator (bybit down from the start), scraped over HTTP like Prometheus
does: its quotes, circuit states and rate ages are there, which no web process exports. A real
qcluster serves the metrics of the safety-net cycle its forked worker ran.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from rates.emulator import EmulatorServer, run_emulator_server
from tests.services import free_port, require, run_python
from tests.stack import Stack

pytestmark = [pytest.mark.nats, pytest.mark.timeout(120)]


@dataclass
class MeteredStack(Stack):
    metrics_port: int = 0
    multiproc_dir: Path | None = None

    def env(self, instance: str) -> dict[str, str]:
        env = super().env(instance)
        if self.metrics_port:
            env["KURS_METRICS_PORT"] = str(self.metrics_port)
        if self.multiproc_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.multiproc_dir)
        return env


@pytest_asyncio.fixture
async def stack(tmp_path: Path) -> AsyncIterator[MeteredStack]:
    require("NATS", "127.0.0.1", 4222)
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=3) as emulator:
        built = MeteredStack(folder=tmp_path, emulator=emulator, poll=1.0)
        await asyncio.to_thread(built.migrate)
        try:
            yield built
        finally:
            await asyncio.to_thread(built.stop)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_until(
    port: int, ready: Callable[[Samples], bool], log: Path, within: float = 60
) -> Samples:
    """Scrape 127.0.0.1:port/metrics as Prometheus does until `ready` holds for the samples."""
    url = f"http://127.0.0.1:{port}/metrics"
    scraped: Samples | None = None
    try:
        async with httpx.AsyncClient(timeout=2) as client, asyncio.timeout(within):
            while scraped is None or not ready(scraped):
                await asyncio.sleep(0.2)
                try:
                    response = await client.get(url)
                except httpx.TransportError:
                    continue  # not listening yet
                assert response.headers["content-type"].startswith("text/plain")
                scraped = samples(response.text)
    except TimeoutError:
        raise AssertionError(f"not on {url}: {scraped}\nlog:\n{log.read_text()[-3000:]}") from None
    return scraped


async def test_the_fetchers_port_serves_its_quote_and_circuit_metrics(stack: MeteredStack) -> None:
    emulator: EmulatorServer = stack.emulator
    emulator.set_fault("bybit", "down")
    stack.metrics_port = free_port()
    log = stack.fetcher().log
    # Until binance's quotes are counted and bybit's circuit has opened (2).
    scraped = await scrape_until(
        stack.metrics_port,
        lambda got: bool(got.get(("kurs_quotes_accepted_total", (("provider", "binance"),))))
        and got.get(("kurs_circuit_state", (("provider", "bybit"),))) == 2,
        log,
    )
    assert scraped[("kurs_circuit_state", (("provider", "binance"),))] == 0
    assert scraped[("kurs_rate_age_seconds", (("pair", "BTC-USD"),))] >= 0
    assert scraped[("kurs_rate_status", (("pair", "BTC-USD"),))] == 0
    bybit_errors = [
        value
        for (name, labels), value in scraped.items()
        if name == "kurs_provider_errors_total" and ("provider", "bybit") in labels
    ]
    assert sum(bybit_errors) >= 1
    assert scraped[("kurs_fetch_cycles_total", (("outcome", "ok"),))] >= 1


ENQUEUE = (
    "import django; django.setup(); from django_q.tasks import async_task; "
    "async_task('rates.tasks.fetch_rates')"
)


async def test_qclusters_port_sums_the_metrics_of_its_worker_processes(
    stack: MeteredStack,
) -> None:
    # No live fetcher: the safety-net task runs a cycle in a forked worker, whose counters only
    # the multiprocess directory brings to the cluster's main process (the one serving the port).
    stack.metrics_port = free_port()
    stack.multiproc_dir = stack.folder / "qcluster-metrics"
    stack.multiproc_dir.mkdir()
    qcluster = stack.spawn(
        "qcluster",
        [sys.executable, "scripts/own_group.py", sys.executable, "manage.py", "qcluster"],
    )
    await scrape_until(stack.metrics_port, lambda got: True, qcluster.log)  # it listens
    enqueued = await asyncio.to_thread(run_python, ["-c", ENQUEUE], stack.env("enqueue"))
    assert enqueued.returncode == 0, enqueued.stderr
    scraped = await scrape_until(
        stack.metrics_port,
        lambda got: ("kurs_fetch_cycles_total", (("outcome", "ok"),)) in got,
        qcluster.log,
    )
    assert scraped[("kurs_quotes_accepted_total", (("provider", "binance"),))] >= 1
