"""The alerting rules (deploy/alerts.yml, docs/operations.md#alerts): promtool accepts them, their
unit tests (deploy/alerts.test.yml) pass and would catch a broken rule, every alert is tested
firing and not firing, reads metrics and labels a real Kurs process exports, and links to its
runbook entry; Prometheus in compose loads the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.prod_stack import exported_names
from tests.services import ROOT
from tests.test_deploy import require_tool, services
from tests.test_grafana_dashboard import declared_labels, scrape_of_a_fresh_process

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
# Labels Prometheus adds to every scraped series, and the histogram's bucket bound.
TARGET_LABELS = {"job", "instance", "le"}


@cache
def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    broken = ALERTS.read_text().replace(
        "kurs_owner_lease_held == 1) == 2", "kurs_owner_lease_held == 1) == 3"
    )
    assert broken != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(broken)
    result = promtool("test", "rules", str(tmp_path / ALERT_TESTS.name))
    assert result.returncode != 0
    assert "alertname: KursPairStale" in result.stdout + result.stderr


def test_it_alerts_on_what_an_operator_must_know() -> None:
    assert [rule["alert"] for rule in rules()] == [
        "KursPairStale",
        "KursProviderCircuitOpen",
        "KursPairInFailover",
        "KursNoOwner",
        "KursNatsDisconnected",
        "KursHighErrorRatio",
        "KursWebEventLag",
        "KursPegBroken",
        "KursProviderExcluded",
    ]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} always fires"


def test_every_alert_reads_metrics_kurs_exports_by_their_labels() -> None:
    exported = exported_names(scrape_of_a_fresh_process())
    declared = declared_labels()
    for rule in rules():
        expr = rule["expr"]
        used = set(re.findall(r"\bkurs_[a-z0-9_]+", expr))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
        known = set().union(*(declared[name] for name in used)) | TARGET_LABELS
        grouped = {
            label.strip()
            for group in re.findall(r"\b(?:by|on) \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        matched = {
            label
            for matchers in re.findall(r"kurs_\w+\{([^}]*)\}", expr)
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers)
        }
        assert grouped | matched <= known, (rule["alert"], (grouped | matched) - known)
    # ...and the check bites: what the alerts need is not what a misspelling would be.
    assert "kurs_owner_lease_held" in exported
    assert "kurs_owner_leases_held" not in exported


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", markdown, re.M)
    }


def test_every_alert_says_how_bad_what_happened_and_where_the_runbook_is() -> None:
    documented = anchors(OPERATIONS.read_text())
    assert "alerts" in documented
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"], rule["alert"]
        assert notes["description"], rule["alert"]
        page, anchor = notes["runbook_url"].split("#")
        assert page == "docs/operations.md"
        assert anchor == rule["alert"].lower()
        assert anchor in documented, rule["alert"]


def test_prometheus_in_compose_loads_the_rules() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # beside prometheus.yml, here and in the image
    volumes = services()["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
