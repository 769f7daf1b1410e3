"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A rate published on NATS reaches a uvicorn web process, its bridge, the page's socket, and the
table row. Set KURS_UPDATE_SCREENSHOT=1 to refresh docs/dashboard.png for the README.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from realtime import events
from realtime import nats as realtime_nats
from realtime.tests.conftest import REPO, NatsServer, WebProcess
from tests.services import in_ci

pytestmark = pytest.mark.nats

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def chromium() -> Path:
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (requirements-dev.txt)"
    if missing:
        if in_ci():
            pytest.fail(f"{missing}; CI=true needs the browser test")
        pytest.skip(missing)
    return CHROMIUM


def rate(
    direction: str,
    value: str,
    provider: str,
    age_s: float = 1,
    derived: bool = False,
    *,
    status: str = "live",
    version: int = 1,
) -> dict[str, object]:
    """`rate.updated` data with the fields of SPEC 7."""
    checked = datetime.now(UTC) - timedelta(seconds=age_s)
    return {
        "direction": direction,
        "value": Decimal(value),
        "provider": provider,
        "source_time": checked,
        "checked_at": checked,
        "status": status,
        "derived": derived,
        "route": [],
        "version": version,
    }


async def test_the_dashboard_shows_a_published_rate_change(
    chromium: Path,
    own_nats: NatsServer,
    web_processes: Callable[..., list[WebProcess]],
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    [web] = web_processes(1, nats_url=own_nats.url)
    assert await asyncio.to_thread(realtime_nats.wait_connected, 10)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 620})
            await page.goto(f"http://127.0.0.1:{web.port}/")
            await expect(page.locator("#status")).to_have_text("live", timeout=10_000)

            events.publish("rate.updated", rate("BTC-USD", "54321.000123", "binance"))
            events.publish("rate.updated", rate("ETH-USD", "3012.5", "bybit", status="failover"))
            events.publish("rate.updated", rate("BTC-RUB", "5012345.67", "coingecko", age_s=300))
            events.publish("rate.updated", rate("ETH-RUB", "278000.1", "binance+cbr", derived=True))
            events.publish("provider.state", {"name": "binance", "state": "closed", "reason": ""})
            events.publish(
                "provider.state", {"name": "bybit", "state": "open", "reason": "HTTP 503"}
            )
            events.publish("fetch.completed", {"stored": 4, "providers": {}, "duration_ms": 38})

            btc = page.locator('tr[data-pair="BTC-USD"] td.value')
            await expect(btc).to_have_text("54321.000123", timeout=10_000)
            await expect(page.locator('tr[data-pair="BTC-RUB"] .tag.stale')).to_be_visible()
            await expect(page.locator('tr[data-pair="ETH-RUB"] .tag.derived')).to_be_visible()
            await expect(page.locator('tr[data-pair="BTC-USD"] .tag.live')).to_be_visible()
            await expect(page.locator('tr[data-pair="ETH-USD"] .tag.failover')).to_be_visible()
            await expect(page.locator('tr[data-provider="bybit"]')).to_contain_text("open")

            # A change of the same pair updates the row in place.
            events.publish("rate.updated", rate("BTC-USD", "54400.5", "binance", version=2))
            await expect(btc).to_have_text("54400.5", timeout=10_000)
            assert await page.locator('tr[data-pair="BTC-USD"]').count() == 1
            await expect(page.locator("#log li").first).to_contain_text("BTC-USD 54400.5")

            await page.screenshot(path=str(tmp_path / "dashboard.png"))
            if os.environ.get("KURS_UPDATE_SCREENSHOT"):
                await page.screenshot(path=str(REPO / "docs" / "dashboard.png"))
        finally:
            await browser.close()
