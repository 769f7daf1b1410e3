"""What on-demand pricing may ask of the exchanges: listings bound the upstream traffic whatever
the clients ask, round budgets answer 429, and each exchange's request weight keeps on-demand off
the part of its limit that is the fetcher's. Requests are counted at the real emulator."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from rates import ondemand
from rates.emulator import EmulatorServer
from rates.exceptions import OnDemandBudgetExceeded
from rates.providers import PROVIDER_CLASSES, Pair
from rates.tests.conftest_emulator import make_provider
from rates.tests.support import FakeClock, point_settings_at
from rates.upstream import LIMITS, ON_DEMAND_SHARE, RoundBudget, WeightLedger, weights

pytestmark = pytest.mark.usefixtures("rate_settings", "fresh_board", "tracked")

# Listed coins, currencies, and codes nobody lists: most pairs of these are priceable somehow.
ASSETS = ["BTC", "ETH", "SOL", "BNB", "USDC", "USDT", "USDTTRC", "XRP", "DOGE"]
ASSETS += ["USD", "EUR", "RUB", "GBP", "JPY", "CNY", "AUD", "ZQA", "ZQB"]


@pytest.fixture
def upstream(emulator: EmulatorServer, settings: Any) -> EmulatorServer:
    point_settings_at(settings, emulator)
    settings.KURS_ONDEMAND_RATE = 10_000.0
    settings.KURS_ONDEMAND_CLIENT_RATE = 10_000.0
    return emulator


async def counts(emulator: EmulatorServer, client: httpx.AsyncClient) -> dict[str, int]:
    response = await client.get(f"{emulator.base_url}/_control/requests")
    return dict(response.json()["counts"])


def listing_bound(elapsed: float) -> dict[str, int]:
    """Requests per provider if each listing is fetched at most once per its interval."""
    return {
        name: (1 + int(elapsed // ondemand.listing_interval(cls))) * cls.listing_requests
        for name, cls in PROVIDER_CLASSES.items()
    }


# --- Listings bound the traffic -------------------------------------------------------------------
async def test_any_number_of_distinct_pairs_costs_one_listing_per_provider_per_interval(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
) -> None:
    pairs = list(itertools.permutations(ASSETS, 2))
    assert len(pairs) == 306

    async def ask(batch: list[tuple[str, str]]) -> set[int]:
        semaphore = asyncio.Semaphore(20)  # the client: 20 at a time

        async def one(base: str, quote: str) -> int:
            async with semaphore:
                response = await async_client.get(f"/api/v1/rates/{base}/{quote}")
                return response.status_code

        return set(await asyncio.gather(*(one(*pair) for pair in batch)))

    assert await ask(pairs[:150]) == {200, 404}
    # Before the change: about 5 requests per new pair, whole-market dumps included.
    assert await counts(upstream, emulator_client) == listing_bound(0)
    on_demand_clock.now = ondemand.LISTING_SECONDS  # the exchanges' listings are due again
    assert await ask(pairs[150:]) == {200, 404}
    assert await counts(upstream, emulator_client) == listing_bound(ondemand.LISTING_SECONDS)
    assert listing_bound(ondemand.LISTING_SECONDS) == {
        "binance": 4,
        "bybit": 2,
        "coingecko": 1,
        "cbr": 1,
    }


async def test_the_listing_prices_pairs_as_a_request_for_them_would(
    upstream: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    books = upstream.market.books
    books["binance"].set("SOLUSDT", Decimal("141.23"))
    books["bybit"].set("ETHBTC", Decimal("0.03351"))
    wanted = [Pair("SOL", "USD"), Pair("ETH", "BTC"), Pair("USDTTRC", "RUB"), Pair("ZQA", "USDT")]
    wanted += [Pair("BTC", "RUB"), Pair("JPY", "RUB"), Pair("SOL", "EUR")]
    for name in PROVIDER_CLASSES:
        provider = make_provider(name, upstream, emulator_client)
        listed = (await provider.listing()).quotes(wanted)
        fetched = await provider.fetch([pair for pair in wanted if pair.code != "ZQA-USDT"])
        assert sorted((q.pair, q.value, q.bid, q.ask, q.proxied) for q in listed) == sorted(
            (q.pair, q.value, q.bid, q.ask, q.proxied) for q in fetched
        ), name
        assert listed, name  # each provider prices at least one of them


# --- Round budgets --------------------------------------------------------------------------------
@pytest.mark.parametrize("door", ["fast path", "django"])
async def test_a_client_over_its_budget_gets_429_with_retry_after_and_others_do_not(
    upstream: EmulatorServer,
    on_demand_clock: FakeClock,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    door: str,
) -> None:
    from config.asgi import http_app

    settings.KURS_ONDEMAND_CLIENT_RATE = 1.0  # 2 rounds saved up, then one a second
    # Both entrances behind the one edge: its route table, or Django's ninja routes.
    monkeypatch.setattr(http_app, "fast", door == "fast path")
    app = http_app

    async def get(path: str, client: str) -> httpx.Response:
        # The ASGI scope's peer address: what uvicorn reports, Django's REMOTE_ADDR.
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            return await http.get(path)

    assert (await get("/api/v1/rates/SOL/USDT", "10.0.0.1")).status_code == 200
    assert (await get("/api/v1/rates/ETH/USDT", "10.0.0.1")).status_code == 200
    refused = await get("/api/v1/rates/BNB/USDT", "10.0.0.1")
    assert refused.status_code == 429, refused.content
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["Content-Type"] == "application/json; charset=utf-8"
    assert refused.json() == {
        "detail": "too many new pairs priced on demand for this client; retry in 1 s"
    }
    convert = await get("/api/v1/convert?from=BNB&to=USDT&amount=1", "10.0.0.1")
    assert (convert.status_code, convert.headers["Retry-After"]) == (429, "1")
    # A pair already answered costs nothing; another client has its own budget.
    assert (await get("/api/v1/rates/SOL/USDT", "10.0.0.1")).status_code == 200
    assert (await get("/api/v1/rates/BNB/USDT", "10.0.0.2")).status_code == 200
    on_demand_clock.now = 1.0
    assert (await get("/api/v1/rates/XRP/USDT", "10.0.0.1")).status_code == 404


def test_the_global_budget_is_shared_by_every_client() -> None:
    clock = FakeClock()
    budget = RoundBudget(rate=1.0, client_rate=100.0, clock=clock)
    budget.take("a")
    budget.take("b")
    with pytest.raises(OnDemandBudgetExceeded, match="for all clients") as refused:
        budget.take("c")
    assert refused.value.retry_after == pytest.approx(1.0)
    with pytest.raises(OnDemandBudgetExceeded):
        budget.take(None)
    clock.now = 1.0
    budget.take(None)  # refilled; a refusal spent nothing


def test_a_refused_round_spends_no_token_of_either_budget() -> None:
    clock = FakeClock()
    budget = RoundBudget(rate=1.0, client_rate=1.0, clock=clock)
    budget.take("a")
    budget.take("a")
    for _ in range(5):
        with pytest.raises(OnDemandBudgetExceeded, match="this client"):
            budget.take("a")
    clock.now = 1.0
    budget.take("b")  # the global bucket got its one token back, not less


# --- Request weight -------------------------------------------------------------------------------
def test_the_ledger_counts_per_window_and_trusts_the_exchange_count() -> None:
    now = [120.0]
    ledger = WeightLedger(clock=lambda: now[0])
    ledger.record("binance", 4)
    ledger.record("binance", 4)
    assert ledger.used("binance") == 8
    ledger.record("binance", 4, reported=2990)  # the fetcher's requests, from another process
    assert ledger.used("binance") == 2990
    ledger.record("binance", 4, reported=12)  # an answer that left before the others
    assert ledger.used("binance") == 2994
    assert ledger.spare("binance", 6) == 0
    assert ledger.spare("binance", 8) == pytest.approx(60.0)  # until the next minute
    now[0] = 180.0
    assert ledger.used("binance") == 0
    assert ledger.spare("binance", 8) == 0
    ledger.hold("bybit", 7.0)
    assert ledger.spare("bybit", 1) == pytest.approx(7.0)
    ledger.record("cbr", 1)  # publishes no limit: never held back
    assert ledger.spare("cbr", 10**6) == 0
    assert LIMITS["binance"].limit * ON_DEMAND_SHARE == 3000


async def test_near_the_weight_limit_on_demand_stops_asking_and_the_fetcher_does_not(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
) -> None:
    upstream.market.spend_binance_weight(2990)  # what others on this IP used this minute
    fetcher_side = make_provider("binance", upstream, emulator_client)
    await fetcher_side.fetch([Pair("BTC", "USDT")])  # price and book: 4 each
    assert weights.used("binance") == 2998
    before = await counts(upstream, emulator_client)
    body = (await async_client.get("/api/v1/rates/SOL/USDT")).json()
    # Binance's listing (weight 8) would pass half the limit (3000): Bybit serves, in failover.
    assert (body["provider"], body["status"]) == ("bybit", "failover")
    after = await counts(upstream, emulator_client)
    assert after["binance"] == before["binance"]
    # The fetcher keeps priority: it asks whatever the weight.
    await fetcher_side.fetch([Pair("BTC", "USDT")])
    assert (await counts(upstream, emulator_client))["binance"] == before["binance"] + 2


@pytest.mark.parametrize(("limited", "other"), [("binance", "bybit"), ("bybit", "binance")])
async def test_a_rate_limit_holds_on_demand_off_that_exchange_for_its_retry_after(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
    limited: str,
    other: str,
) -> None:
    # Binance answers 429 with Retry-After; Bybit an HTTP 200 with retCode 10006 and the reset.
    upstream.set_fault(limited, "rate_limited", retry_after=30)
    body = (await async_client.get("/api/v1/rates/SOL/USDT")).json()
    assert body["provider"] == other
    assert weights.spare(limited, 1) == pytest.approx(30, abs=2)
    upstream.set_fault(limited, "ok")
    asked = (await counts(upstream, emulator_client))[limited]
    on_demand_clock.now = ondemand.LISTING_SECONDS  # the listing is due, but the exchange said wait
    body = (await async_client.get("/api/v1/rates/ETH/USDT")).json()
    assert body["provider"] == other
    assert (await counts(upstream, emulator_client))[limited] == asked
