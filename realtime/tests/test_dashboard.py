"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A rate published on NATS reaches a uvicorn web process, its bridge, the page's socket, the table
row and the pair's chart (drawn first from the candles endpoint). Each test has its own copy of
the web database and its own shared-cache folder (the provider statuses), written beforehand by
a separate process as the fetcher would. Set KURS_UPDATE_SCREENSHOT=1 to refresh
docs/dashboard.png for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from edge import csp
from realtime import events
from realtime import nats as realtime_nats
from realtime.tests.conftest import MIGRATE_TIMEOUT, REPO, WEB_TEST_TIMEOUT, WebProcess
from tests.services import NatsServer, in_ci, real_settings_environment, run_python

if TYPE_CHECKING:
    from playwright.async_api import Locator, Page

# A web process, a browser and this test share two cores with other suites: every wait below is
# on a condition (an element's state, a connection), given WAIT_S before it fails.
pytestmark = [pytest.mark.nats, pytest.mark.timeout(WEB_TEST_TIMEOUT)]
WAIT_S = 30.0

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


# Written into the test's database and shared cache before the web process starts: an hour of
# BTC-USD history from binance (40 rates, one every 85 s), bybit and cbr with errors 12 and 40
# minutes old and closed circuits (history, not a fault), coingecko open on a fresh error.
SEED = """
import django
django.setup()
from datetime import timedelta
from decimal import Decimal
from django.utils import timezone
from items.models import Item
from rates import provider_health
from rates.models import Rate

now = timezone.now()
if {history}:
    btc, _ = Item.objects.get_or_create(base="BTC", quote="USD")
    Item.objects.get_or_create(base="ETH", quote="USD")
    Rate.objects.bulk_create(
        Rate(item=btc, provider="binance", value=Decimal(54120 + 4 * n + 9 * (n * 7 % 5)),
             source_time=now - timedelta(seconds=85 * (40 - n)),
             received_at=now - timedelta(seconds=85 * (40 - n)))
        for n in range(40)
    )
bybit = provider_health.monitor_for("bybit")
bybit.failed("HTTP 503 from /v5/market/tickers", kind="http")
bybit.last_error_at = now - timedelta(minutes=12)
bybit.succeeded()
cbr = provider_health.monitor_for("cbr")
cbr.failed("HTTP 502 from /scripts/XML_daily.asp", kind="http")
cbr.last_error_at = now - timedelta(minutes=40)
cbr.succeeded()
coingecko = provider_health.monitor_for("coingecko")
for _ in range(coingecko.breaker.threshold):
    coingecko.failed("timeout after 5.0 s", kind="timeout")
provider_health.flush_statuses()
"""


@pytest.fixture
def web_database(web_database: str, tmp_path: Path) -> str:
    """A copy of the migrated web database for this test alone (it adds items and history)."""
    copy = tmp_path / "dashboard.sqlite3"
    shutil.copy(web_database.removeprefix("sqlite:///"), copy)
    return f"sqlite:///{copy}"


@pytest.fixture
def seed(web_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Seed the web database and provider statuses; the web processes share the cache folder."""
    cache = tmp_path / "shared-cache"
    # The real settings' file-backed shared cache (the test settings' is per process).
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "config.settings")
    monkeypatch.setenv("KURS_SHARED_CACHE_DIR", str(cache))

    def write(history: bool, extra: str = "") -> None:
        environment = real_settings_environment(database_url=web_database, shared_cache_dir=cache)
        code = SEED.format(history=history) + extra
        result = run_python(["-c", code], environment, timeout=MIGRATE_TIMEOUT)
        assert result.returncode == 0, result.stderr

    return write


@pytest.fixture
def start_web(
    own_nats: NatsServer,
    seed: Callable[..., None],
    web_processes: Callable[..., list[WebProcess]],
) -> Callable[..., WebProcess]:
    """Seed (history or not, and any extra code), then start one web process on own NATS."""

    def start(history: bool, extra: str = "") -> WebProcess:
        seed(history, extra)
        [web] = web_processes(1, nats_url=own_nats.url)
        return web

    return start


ADMIN_USER = """
from django.contrib.auth.models import User
User.objects.create_superuser("admin", "admin@example.com", "kurs-admin-password")
"""


# Run by the browser before any of the page's own scripts, on every document of the page.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(event.violatedDirective + " " + event.blockedURI);
});
"""


def console_errors(page: Page) -> list[str]:
    """The page's console errors and uncaught exceptions (a missing favicon is one, and so is
    anything the Content-Security-Policy refused: Chromium reports each as a console error)."""
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The console names no URL for a failed load: say which.
    page.on(
        "response",
        lambda response: errors.append(f"{response.status} {response.url}")
        if response.status >= 400
        else None,
    )
    return errors


@contextlib.asynccontextmanager
async def browser_page(chromium: Path, **options: Any) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page of a fresh headless Chromium, recording console errors and CSP violations."""
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_S * 1000)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(**options)
            await page.add_init_script(RECORD_CSP_VIOLATIONS)
            yield page, console_errors(page)
        finally:
            await browser.close()


async def expect_age(
    locator: Locator, text: str, age_s: float, published: float, unit_s: float = 1.0
) -> None:
    """`locator` reads `text` with a number of `unit_s` for `{}`: the age of something that was
    `age_s` old at `published` (time.monotonic()) or later, so at least `age_s` and at most as
    old as it is now, however long the page took to show it."""
    from playwright.async_api import expect

    pattern = "^" + re.escape(text).replace(r"\{\}", r"([0-9]+)") + "$"
    await expect(locator).to_have_text(re.compile(pattern))
    shown = re.match(pattern, await locator.text_content() or "")
    oldest = (age_s + time.monotonic() - published) / unit_s + 1  # the page rounds down
    assert shown is not None
    assert age_s / unit_s - 1 <= int(shown[1]) <= oldest, (shown[0], oldest)


async def csp_violations(page: Page) -> list[str]:
    """What the policy refused in the current document (RECORD_CSP_VIOLATIONS must be added)."""
    return list(await page.evaluate("window.__cspViolations"))


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
    """`rate.updated` data with the fields of docs/events.md#envelope-and-event-types."""
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


async def test_the_dashboard_says_nothing_is_quoted_yet_and_dates_provider_errors(
    chromium: Path,
    start_web: Callable[..., WebProcess],
) -> None:
    from playwright.async_api import expect

    seeded = time.monotonic()  # bybit's error is 12 minutes old a little after this
    web = start_web(False)
    async with browser_page(chromium) as (page, errors):
        response = await page.goto(f"http://127.0.0.1:{web.port}/")
        assert response is not None
        assert response.headers["content-security-policy"] == csp.POLICY

        # The snapshot arrives empty: no endless "waiting", but what the providers say.
        empty = page.locator("#courses .empty-row")
        await expect(empty).to_contain_text("no rates yet — providers unreachable?")
        await expect(empty).to_contain_text("coingecko: open (last error")
        await expect(empty).not_to_contain_text("waiting for the first snapshot")

        # An old error beside a closed circuit is dated and greyed; an open one is current.
        bybit = page.locator('tr[data-provider="bybit"] td.error')
        error = "last error {} min ago: HTTP 503 from /v5/market/tickers"
        await expect_age(bybit, error, 12 * 60, seeded, unit_s=60)
        await expect(bybit).to_have_class("error past")
        await expect(page.locator('tr[data-provider="bybit"] td.state')).to_have_text("closed")
        coingecko = page.locator('tr[data-provider="coingecko"] td.error')
        await expect(coingecko).to_contain_text("s ago: timeout after 5.0 s")
        await expect(coingecko).to_have_class("error current")
        await expect(page.locator('tr[data-provider="binance"] td.error')).to_have_text("")

        # The badge says the socket is open but nothing is quoted.
        badge = page.locator("#status")
        await expect(badge).to_have_text("no rates yet")
        await expect(badge).to_have_attribute("data-socket", "open")
        await expect(badge).to_have_class("stale")

        # The first rate replaces the empty state, read grouped and rounded, exact in its title.
        assert await asyncio.to_thread(realtime_nats.wait_connected, WAIT_S)
        published = time.monotonic()
        events.publish("rate.updated", rate("BTC-USD", "54321.5", "binance"))
        value = page.locator('tr[data-pair="BTC-USD"] td.value')
        await expect(value).to_have_text("54,321.50")
        await expect(value).to_have_attribute("title", "54321.5")
        await expect_age(badge, "live · {} s ago", 1, published)
        await expect(badge).to_have_class("open")
        assert await empty.count() == 0
        assert errors == []
        assert await csp_violations(page) == []


async def test_the_dashboard_shows_statuses_and_charts_from_candles_extended_live(
    chromium: Path,
    start_web: Callable[..., WebProcess],
    tmp_path: Path,
) -> None:
    from playwright.async_api import expect

    web = start_web(True)
    assert await asyncio.to_thread(realtime_nats.wait_connected, WAIT_S)
    async with browser_page(chromium, viewport={"width": 1200, "height": 620}) as (page, errors):
        await page.goto(f"http://127.0.0.1:{web.port}/")
        await expect(page.locator("#status")).to_have_attribute("data-socket", "open")

        events.publish("rate.updated", rate("BTC-USD", "54321.000123", "binance"))
        events.publish("rate.updated", rate("ETH-USD", "3012.5", "bybit", status="failover"))
        events.publish("rate.updated", rate("BTC-RUB", "5012345.67", "coingecko", age_s=300))
        events.publish("rate.updated", rate("ETH-RUB", "278000.1", "binance+cbr", derived=True))
        events.publish("provider.state", {"name": "binance", "state": "closed", "reason": ""})
        events.publish("provider.state", {"name": "bybit", "state": "open", "reason": "HTTP 503"})
        events.publish("fetch.completed", {"stored": 4, "providers": {}, "duration_ms": 38})

        btc = page.locator('tr[data-pair="BTC-USD"] td.value')
        await expect(btc).to_have_text("54,321.00")
        await expect(btc).to_have_attribute("data-exact", "54321.000123")
        await expect(page.locator('tr[data-pair="ETH-RUB"] td.value')).to_have_text("278,000.10")
        # A stale value looks stale, and the badge counts it.
        await expect(page.locator('tr[data-pair="BTC-RUB"] .tag.stale')).to_be_visible()
        await expect(page.locator('tr[data-pair="BTC-RUB"]')).to_have_class(
            re.compile(r"\bstale\b")
        )
        await expect(page.locator('tr[data-pair="BTC-USD"]')).not_to_have_class(
            re.compile(r"\bstale\b")
        )
        await expect(page.locator("#status")).to_have_text(
            re.compile(r"^live · [0-9]+ s ago · 1 stale$")  # how many: the machine's load
        )
        await expect(page.locator("#status")).to_have_class("partial")
        await expect(page.locator('tr[data-pair="ETH-RUB"] .tag.derived')).to_be_visible()
        await expect(page.locator('tr[data-pair="BTC-USD"] .tag.live')).to_be_visible()
        await expect(page.locator('tr[data-pair="ETH-USD"] .tag.failover')).to_be_visible()
        await expect(page.locator('tr[data-provider="bybit"]')).to_contain_text("open")
        # The event made bybit's error current again, dated by the frame.
        # (A loaded machine may take a second or two to deliver and render it.)
        await expect(page.locator('tr[data-provider="bybit"] td.error')).to_have_text(
            re.compile(r"^last error [0-9] s ago: HTTP 503$")
        )
        await expect(page.locator('tr[data-provider="bybit"] td.error')).to_have_class(
            "error current"
        )

        # BTC-USD's chart: its 40 minutes of 1m candles (one rate each), then the live rate;
        # ETH-USD has no history, its chart starts with its first live rate.
        btc_chart = page.locator('tr[data-pair="BTC-USD"] svg.spark')
        await expect(btc_chart).to_have_attribute("data-points", "41")
        eth_chart = page.locator('tr[data-pair="ETH-USD"] svg.spark')
        await expect(eth_chart).to_have_attribute("data-points", "1")

        # A change of the same pair updates the row in place, its sources too (the socket
        # asks for `expand=sources`).
        update = rate("BTC-USD", "54400.5", "binance", version=2)
        when = update["checked_at"]
        update["sources"] = [
            {"provider": "binance", "value": Decimal("54400.5"), "source_time": when},
            {
                "provider": "bybit",
                "value": Decimal("54390"),
                "source_time": when,
                "excluded": True,
                "reason": "priority",
            },
        ]
        events.publish("rate.updated", update)
        await expect(btc).to_have_text("54,400.50")
        sources = page.locator('tr[data-pair="BTC-USD"] td.sources')
        await expect(sources).to_have_text("binance 54,400.50bybit 54,390.00")
        await expect(sources.locator(".source.excluded.priority")).to_have_text("bybit 54,390.00")
        await expect(btc_chart).to_have_attribute("data-points", "42")
        line = await btc_chart.locator("polyline").get_attribute("points")
        assert line is not None
        assert len(line.split()) == 42
        assert await page.locator('tr[data-pair="BTC-USD"]').count() == 1
        await expect(page.locator("#log li").first).to_contain_text("BTC-USD 54,400.50")

        assert errors == []
        assert await csp_violations(page) == []
        await page.screenshot(path=str(tmp_path / "dashboard.png"))
        if os.environ.get("KURS_UPDATE_SCREENSHOT"):
            await page.screenshot(path=str(REPO / "docs" / "dashboard.png"))


# Pixels of the candles' colours (chart.js: up #3fb950, down #f85149) on the chart's canvases.
CANDLE_PIXELS = """() => {
  let count = 0;
  for (const canvas of document.querySelectorAll("#chart canvas")) {
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < data.length; i += 4) {
      const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
      if ((r === 0x3f && g === 0xb9 && b === 0x50) || (r === 0xf8 && g === 0x51 && b === 0x49)) {
        count++;
      }
    }
  }
  return count;
}"""


async def test_the_pair_chart_draws_candles_extends_live_and_looks_up_a_point_in_time(
    chromium: Path,
    start_web: Callable[..., WebProcess],
    tmp_path: Path,
) -> None:
    """lightweight-charts (vendored) under the strict policy: BTC-USD's 40 one-minute candles
    from the API, a live rate opening the 41st bar and another moving it, then a click on a bar
    asking `rates/latest?at=` and showing the server's answer, whatever it is."""
    from playwright.async_api import expect

    web = start_web(True)
    assert await asyncio.to_thread(realtime_nats.wait_connected, WAIT_S)
    viewport = {"width": 1200, "height": 900}
    async with browser_page(chromium, viewport=viewport) as (page, errors):
        await page.goto(f"http://127.0.0.1:{web.port}/")
        await expect(page.locator("#status")).to_have_attribute("data-socket", "open")
        events.publish("rate.updated", rate("BTC-USD", "54321.5", "binance"))
        chart = page.locator("#chart")
        await expect(page.locator("#chart-panel")).to_have_attribute("data-pair", "BTC-USD")
        await expect(chart).to_have_attribute("data-loaded", "candles")
        await expect(chart).to_have_attribute("data-bars", "41")
        await expect(page.locator("#chart-pair")).to_have_value("BTC-USD")
        assert await chart.locator("canvas").count() > 0
        async with asyncio.timeout(WAIT_S):
            while await page.evaluate(CANDLE_PIXELS) < 100:  # noqa: ASYNC110 - drawn by frames
                await asyncio.sleep(0.05)
        # The same minute's next rate moves the live bar, not a new one.
        events.publish("rate.updated", rate("BTC-USD", "54400.25", "binance", version=2))
        await expect(chart).to_have_attribute("data-close", "54400.25")
        await expect(chart).to_have_attribute("data-bars", "41")

        # A click on a bar asks what was served at the end of its minute.
        box = await chart.bounding_box()
        assert box is not None
        async with page.expect_response(re.compile(r"/rates/latest\?at=")) as answered:
            await page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        response = await answered.value
        body = await response.json()
        answer = page.locator("#chart-at")
        await expect(answer).to_have_attribute("data-status", str(response.status))
        if response.status >= 400:
            await expect(answer).to_have_class("error")
            await expect(answer).to_contain_text(f"(HTTP {response.status}): {body['detail']}")
        elif "valid_from" in body:
            await expect(answer).to_have_class("answer")
            await expect(answer).to_contain_text(f"served from {body['valid_from']}")
        else:
            await expect(answer).to_contain_text("does not answer ?at= yet")
        at = await answer.get_attribute("data-at")
        assert at is not None
        assert response.url.endswith("at=" + at.replace(":", "%3A"))
        assert datetime.fromisoformat(at) <= datetime.now(UTC)

        # A click on another row charts that pair; the only 4xx allowed is the lookup's own.
        await page.locator('tr[data-pair="BTC-USD"] td.pair').click()
        expected = [f"{response.status} {response.url}"] if response.status >= 400 else []
        assert [e for e in errors if "Failed to load resource" not in e] == expected
        assert await csp_violations(page) == []
        await page.screenshot(path=str(tmp_path / "dashboard-chart.png"), full_page=True)
        if os.environ.get("KURS_UPDATE_SCREENSHOT"):
            shutil.copy(tmp_path / "dashboard-chart.png", REPO / "docs" / "img")


async def test_the_admin_works_under_the_content_security_policy(
    chromium: Path,
    start_web: Callable[..., WebProcess],
) -> None:
    """Login page, sign-in, the index, the items list and an item's form: styled, scripted
    (the admin's own static files) and nothing refused by the policy."""
    from playwright.async_api import expect

    web = start_web(True, ADMIN_USER)
    async with browser_page(chromium) as (page, errors):
        response = await page.goto(f"http://127.0.0.1:{web.port}/admin/login/")
        assert response is not None
        assert response.headers["content-security-policy"] == csp.POLICY
        # The admin's stylesheet applied: the login box is laid out, not raw HTML.
        assert await page.locator("#container").evaluate(
            "element => getComputedStyle(element).display"
        ) in ("flex", "block")
        header = page.locator("#header")
        background = await header.evaluate("el => getComputedStyle(el).backgroundColor")
        assert background not in ("rgba(0, 0, 0, 0)", "transparent")
        assert await csp_violations(page) == []

        await page.fill("#id_username", "admin")
        await page.fill("#id_password", "kurs-admin-password")
        await page.click("input[type=submit]")
        await expect(page.locator("#site-name")).to_be_visible()
        await expect(page.locator("#content h1")).to_have_text("Site administration")
        assert await csp_violations(page) == []

        await page.goto(f"http://127.0.0.1:{web.port}/admin/items/item/")
        await expect(page.locator("#result_list")).to_contain_text("BTC-USD")
        assert await csp_violations(page) == []
        # The changelist's script works: "select all" ticks every row.
        await page.click("#action-toggle")
        await expect(page.locator("input.action-select").first).to_be_checked()

        await page.locator("#result_list a", has_text="BTC-USD").first.click()
        await expect(page.locator("form#item_form")).to_be_visible()
        assert await csp_violations(page) == []

        # The list's history link opens the pair's 40 seeded rates, newest first, read-only.
        await page.go_back()
        row = page.locator(
            "#result_list tr", has=page.locator("a", has_text=re.compile("^BTC-USD$"))
        )
        await row.locator("td.field-history a").click()
        await expect(page.locator("#result_list tbody tr")).to_have_count(40)
        await expect(page.locator("#result_list tbody tr").first).to_contain_text("54,3")
        assert await page.locator("#content-main .object-tools a").count() == 0
        assert await csp_violations(page) == []
        assert errors == []


async def test_the_badge_says_how_old_the_rates_are_when_the_socket_is_gone(
    chromium: Path,
    start_web: Callable[..., WebProcess],
) -> None:
    from playwright.async_api import expect

    web = start_web(False)
    assert await asyncio.to_thread(realtime_nats.wait_connected, WAIT_S)
    async with browser_page(chromium) as (page, _errors):
        await page.goto(f"http://127.0.0.1:{web.port}/")
        badge = page.locator("#status")
        await expect(badge).to_have_attribute("data-socket", "open")
        published = time.monotonic()
        events.publish("rate.updated", rate("BTC-USD", "54321.5", "binance", age_s=20))
        await expect_age(badge, "live · {} s ago", 20, published)

        # The server goes away (the page's reconnect attempts are console errors, not checked):
        # the badge no longer says "live", but how old the rates it still shows are.
        await asyncio.to_thread(web.stop)
        await expect_age(badge, "reconnecting… · rates {} s old", 20, published)
        await expect(badge).to_have_class("closed")
        await expect(badge).to_have_attribute("data-socket", "closed")


async def test_a_slow_providers_answer_does_not_undo_a_newer_provider_event(
    chromium: Path,
    start_web: Callable[..., WebProcess],
) -> None:
    from playwright.async_api import Route, expect

    web = start_web(False)
    assert await asyncio.to_thread(realtime_nats.wait_connected, WAIT_S)
    release = asyncio.Event()
    held: list[Route] = []

    async def hold(route: Route) -> None:
        held.append(route)
        await release.wait()
        await route.continue_()

    async with browser_page(chromium) as (page, errors):
        await page.route("**/api/v1/providers", hold)
        await page.goto(f"http://127.0.0.1:{web.port}/")
        await expect(page.locator("#status")).to_have_attribute("data-socket", "open")
        async with asyncio.timeout(WAIT_S):
            while not held:  # noqa: ASYNC110 - the page's first request, routed above
                await asyncio.sleep(0.01)
        # bybit opens while the page's /providers request (answering "closed") is on its way.
        events.publish("provider.state", {"name": "bybit", "state": "open", "reason": "HTTP 503"})
        state = page.locator('tr[data-provider="bybit"] td.state')
        await expect(state).to_have_text("open")
        async with page.expect_response("**/api/v1/providers"):
            release.set()
        # The answer arrived and was applied to the other providers, not to bybit.
        await expect(page.locator('tr[data-provider="cbr"] td.state')).to_have_text("closed")
        await expect(state).to_have_text("open")
        assert errors == []


# The pairs that migrations seed (items/migrations/0002_seed_default_pairs.py).
DEFAULT_PAIRS = tuple(
    f"{b}-{q}" for b in ("BTC", "ETH", "USDTTRC", "USDTERC") for q in ("RUB", "USD")
)

# The page's width against the window's: more means a horizontal scroll bar.
PAGE_WIDTHS = "[document.documentElement.scrollWidth, window.innerWidth]"


async def test_the_dashboard_fits_and_summarises_errors_with_a_provider_down(
    chromium: Path, tmp_path: Path
) -> None:
    """A real fetcher and web process against the emulator, Binance answering 503 with an
    nginx error page: the page fits 1,400 and 390 px, says how fresh the rates are and shows the
    error as one short line."""
    from playwright.async_api import expect

    from rates.emulator import run_emulator_server
    from tests.stack import Stack

    async with run_emulator_server(host="127.0.0.1", port=0, tick=0.5, seed=7) as emulator:
        stack = Stack(
            folder=tmp_path, emulator=emulator, providers="binance,bybit,coingecko,cbr", poll=2.0
        )
        await asyncio.to_thread(stack.migrate, active=DEFAULT_PAIRS)
        async with httpx.AsyncClient() as client:
            down = await client.post(f"{emulator.base_url}/_control/binance", json={"mode": "down"})
            assert down.status_code == 200
        try:
            stack.fetcher()
            web = await asyncio.to_thread(stack.web)
            url = f"http://127.0.0.1:{web.port}"
            viewport = {"width": 1400, "height": 900}
            async with browser_page(chromium, viewport=viewport) as (page, errors):
                await page.goto(f"{url}/")
                binance = page.locator('tr[data-provider="binance"] td.error')
                await expect(binance).to_contain_text("HTTP 503 from 127.0.0.1")
                await expect(binance).to_contain_text("Service Temporarily Unavailable")
                await expect(page.locator("#courses tr[data-pair]")).to_have_count(
                    len(DEFAULT_PAIRS)
                )
                await expect(page.locator('tr[data-pair="BTC-USD"] .tag.failover')).to_be_visible()
                await expect(page.locator("#status")).to_have_text(
                    re.compile(r"^live · [0-9]+ s ago")
                )
                for error in await page.locator("#providers td.error").all_text_contents():
                    assert "<" not in error
                # The API's error is as plain as the page's.
                answer = await page.request.get(f"{url}/api/v1/providers")
                last = {p["name"]: p["last_error"] or "" for p in await answer.json()}
                assert "HTTP 503 from 127.0.0.1" in last["binance"]
                assert "<" not in "".join(last.values())

                # Bybit's stream moves BTC-USD every tick: a few points make the chart a line.
                btc = page.locator('tr[data-pair="BTC-USD"]')
                await expect(btc.locator("svg.spark")).to_have_attribute(
                    "data-points", re.compile(r"^([5-9]|[1-9][0-9]+)$")
                )

                widths = {}
                for width in (1400, 390):
                    await page.set_viewport_size({"width": width, "height": 900})
                    widths[width] = tuple(await page.evaluate(PAGE_WIDTHS))
                    # Value, status and chart of a row are on screen, not only the pair.
                    for column in ("td.value", "td.flags", "td.chart"):
                        box = await btc.locator(column).bounding_box()
                        assert box is not None, column
                        assert box["x"] + box["width"] <= width, (column, box)
                    shot = tmp_path / f"dashboard-provider-down-{width}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    if os.environ.get("KURS_UPDATE_SCREENSHOT"):
                        shutil.copy(shot, REPO / "docs" / "img" / shot.name)
                print("page widths", widths)
                assert widths == {1400: (1400, 1400), 390: (390, 390)}
                assert errors == []
                assert await csp_violations(page) == []
        finally:
            await asyncio.to_thread(stack.stop)
