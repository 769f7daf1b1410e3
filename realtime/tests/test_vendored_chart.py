"""The vendored chart library is the version scripts/vendor_lightweight_charts.sh pins, with its
licence beside it, and the page loads it (docs/decisions.md#the-dashboards-chart-library)."""

from __future__ import annotations

import re

from realtime.tests.conftest import REPO

SCRIPT = REPO / "scripts" / "vendor_lightweight_charts.sh"
VENDOR = REPO / "realtime" / "static" / "realtime" / "vendor"


def test_the_vendored_build_is_the_pinned_version_with_its_licence() -> None:
    script = SCRIPT.read_text()
    version = re.search(r"^VERSION=(\d+\.\d+\.\d+)$", script, re.MULTILINE)
    assert version is not None
    assert re.search(r"^INTEGRITY=sha512-[A-Za-z0-9+/]{86}==$", script, re.MULTILINE)
    build = (VENDOR / "lightweight-charts.standalone.production.js").read_text()
    assert f"TradingView Lightweight Charts™ v{version.group(1)}" in build[:300]
    assert "Apache License" in (VENDOR / "lightweight-charts.LICENSE").read_text()
    page = (REPO / "templates" / "dashboard.html").read_text()
    assert "realtime/vendor/lightweight-charts.standalone.production.js" in page
