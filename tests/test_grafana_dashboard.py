"""The provisioned Grafana dashboard (deploy/grafana) shows what an operator needs, from metrics
that Kurs really exports: every expression is checked against the `/metrics` of a real process.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from edge import metrics as config_metrics
from rates import metrics as rates_metrics
from realtime import metrics as realtime_metrics
from tests.prod_stack import DASHBOARD, dashboard_metrics, exported_names
from tests.services import ROOT, run_python

GRAFANA = ROOT / "deploy" / "grafana"

SCRAPE = """
import django
django.setup()
from django.test import Client
print(Client(HTTP_HOST="localhost").get("/metrics").content.decode())
"""


def panels() -> list[dict[str, Any]]:
    return json.loads(DASHBOARD.read_text())["panels"]


def scrape_of_a_fresh_process() -> str:
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"} | {
        "DJANGO_SETTINGS_MODULE": "config.test_settings"
    }
    result = run_python(["-c", SCRAPE], env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_panel_queries_metrics_that_kurs_exports() -> None:
    text = scrape_of_a_fresh_process()
    exported = exported_names(text)
    assert "kurs_http_requests_total" in exported  # the scrape is Kurs's, not an empty page
    used = dashboard_metrics()
    assert used - exported == set()
    # ...and the check bites: a misspelt name is not "exported".
    assert "kurs_quote_accepted_total" not in exported


def declared_labels() -> dict[str, set[str]]:
    """Each Kurs metric's series names -> its label names, from the metric objects themselves."""
    declared: dict[str, set[str]] = {}
    for module in (config_metrics, rates_metrics, realtime_metrics):
        for metric in vars(module).values():
            if isinstance(metric, MetricWrapperBase):
                for suffix in ("", "_total", "_bucket"):
                    # prometheus_client keeps label names only here (no public accessor).
                    declared[metric._name + suffix] = set(metric._labelnames)
    return declared


def test_the_panels_group_by_labels_the_metrics_have() -> None:
    declared = declared_labels()
    grouped = 0
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for group, metric in re.findall(r"by \(([^)]*)\) \((?:\w+\()?(kurs_\w+)", expr):
                wanted = {name.strip() for name in group.split(",")} - {"le"}
                assert wanted <= declared[metric], (panel["title"], metric, wanted)
                grouped += 1
    assert grouped >= 8


def test_it_shows_what_an_operator_watches() -> None:
    used = dashboard_metrics()
    for metric in (
        "kurs_rate_status",  # status per pair
        "kurs_rate_checked_timestamp_seconds",  # rate age per pair, now
        "kurs_rate_age_seconds",  # ...and when accepted
        "kurs_quotes_accepted_total",
        "kurs_quotes_rejected_total",
        "kurs_circuit_state",  # provider states
        "kurs_failovers_total",
        "kurs_http_requests_total",  # request rate
        "kurs_http_request_seconds_bucket",  # latency
        "kurs_ws_connections",
        "kurs_sse_connections",
    ):
        assert metric in used, metric
    status = next(p for p in panels() if "kurs_rate_status" in p["targets"][0]["expr"])
    assert "by (pair)" in status["targets"][0]["expr"]
    mapped = status["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {m["text"] for m in mapped.values()} == {"live", "failover", "stale", "thin"}


def test_the_dashboard_is_provisioned_from_prometheus() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    for panel in panels():
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/kurs.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
