"""`GET /api/v1/rates/{base}/{quote}`: tracked pairs from the snapshot, any other pair on demand
from the providers (the exchange emulator here), cached and coalesced. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient, Client
from django.utils import timezone

from rates import ondemand, services
from rates.emulator import EmulatorServer
from rates.exceptions import PairNotPriced
from rates.models import Rate
from rates.ondemand import derivation_routes
from rates.providers import Pair
from rates.snapshot import Course
from rates.tests.support import FakeClock, point_settings_at

pytestmark = pytest.mark.usefixtures("rate_settings", "fresh_board", "tracked")

STEP = Decimal("1e-18")


@pytest.fixture
def upstream(emulator: EmulatorServer, settings: Any) -> EmulatorServer:
    """Providers pointed at the emulator, with a few exact prices."""
    point_settings_at(settings, emulator)
    books = emulator.market.books
    books["binance"].set("SOLUSDT", Decimal("141.23"))
    books["bybit"].set("SOLUSDT", Decimal("141.31"))
    books["binance"].set("BNBUSDT", Decimal("600.5"))
    books["coingecko"].set("bitcoin.rub", Decimal("7200987.654321"))
    return emulator


async def upstream_calls(emulator: EmulatorServer, client: httpx.AsyncClient) -> Counter[str]:
    """`provider path` -> how many requests the emulator served, from its control API."""
    response = await client.get(f"{emulator.base_url}/_control/requests")
    return Counter(f"{r['provider']} {r['path']}" for r in response.json()["requests"])


def quantized(value: Decimal) -> Decimal:
    """A derived rate as `route_value` rounds it: 18 places, or 24 significant digits."""
    with localcontext() as context:
        context.prec = 80
        places = max(18, ondemand.SIGNIFICANT - 1 - value.adjusted())
        return value.quantize(Decimal(1).scaleb(-places))


async def get_rate(client: AsyncClient, base: str, quote: str) -> Any:
    return await client.get(f"/api/v1/rates/{base}/{quote}")


# --- Untracked pairs, on demand ------------------------------------------------------------------
async def test_it_prices_an_untracked_pair_from_the_highest_priority_provider(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    before = timezone.now()
    response = await get_rate(async_client, "sol", "usdt")
    assert response.status_code == 200, response.content
    body = json.loads(response.content, parse_float=Decimal)
    assert body == {
        "pair": "SOL-USDT",
        "value": Decimal("141.23"),
        "provider": "binance",
        "source_time": body["source_time"],
        "age_s": body["age_s"],
        "derived": False,
        "stale": False,
        "status": "live",
        "route": [],
        "mode": "priority",
        "n_sources": 1,
        "dispersion_bps": None,
        "bid": None,
        "ask": None,
        "spread_bps": None,
        "buy": Decimal("141.23"),
        "sell": Decimal("141.23"),
    }
    source_time = datetime.fromisoformat(body["source_time"])
    assert before - timedelta(seconds=1) <= source_time <= timezone.now()
    assert 0 <= body["age_s"] < 5


async def test_on_demand_quotes_touch_no_live_state(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    on_demand_clock: FakeClock,
    published_events: list[tuple[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def accept_quote(*args: object, **kwargs: object) -> None:
        raise AssertionError("an on-demand quote went into the live pipeline")

    monkeypatch.setattr(services, "accept_quote", accept_quote)
    monkeypatch.setattr(services, "accept_quotes", accept_quote)
    # No django_db mark: any database access (a history row) would fail this test outright.
    for base, quote in [("SOL", "USDT"), ("BNB", "RUB"), ("RUB", "BTC")]:
        assert (await get_rate(async_client, base, quote)).status_code == 200
    assert published_events == []  # no rate.updated: the pairs never reached the board


@pytest.mark.django_db(transaction=True)
async def test_on_demand_quotes_store_no_rate_rows(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    try:
        assert (await get_rate(async_client, "BNB", "RUB")).status_code == 200
        assert (await get_rate(async_client, "SOL", "USDT")).status_code == 200
        assert await Rate.objects.acount() == 0
    finally:
        await sync_to_async(connections.close_all)()


async def test_a_hundred_concurrent_requests_cost_one_call_per_provider(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
) -> None:
    upstream.set_fault("binance", "slow", delay=0.3)  # the round is still open as others arrive
    responses = await asyncio.gather(*(get_rate(async_client, "SOL", "USDT") for _ in range(100)))
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["value"] for r in responses} == {141.23}
    # One listing per provider that lists the pair or a leg of a route to it: Binance's is two
    # requests (price and book), CoinGecko lists SOL-USD; the Bank of Russia has no leg.
    assert await upstream_calls(upstream, emulator_client) == Counter(
        {
            "binance /api/v3/ticker/price": 1,
            "binance /api/v3/ticker/bookTicker": 1,
            "bybit /v5/market/tickers": 1,
            "coingecko /api/v3/simple/price": 1,
        }
    )


async def test_concurrent_lookups_share_one_round_even_with_no_cache(
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every answer expires at once: only coalescing can keep this to one round.
    monkeypatch.setattr(ondemand, "CACHE_SECONDS", 0.0)
    clock = FakeClock()
    rates = ondemand.OnDemandRates(clock=clock)
    try:
        results = await asyncio.gather(*(rates.get(Pair("SOL", "USDT")) for _ in range(100)))
        assert {result.value for result in results} == {Decimal("141.23")}
        calls = await upstream_calls(upstream, emulator_client)
        assert calls["binance /api/v3/ticker/price"] == 1
        assert calls["bybit /v5/market/tickers"] == 1
        # The round is over and no answer is cached, but the listings still serve.
        await rates.get(Pair("SOL", "USDT"))
        assert await upstream_calls(upstream, emulator_client) == calls
        clock.now = ondemand.LISTING_SECONDS
        await rates.get(Pair("SOL", "USDT"))
        calls = await upstream_calls(upstream, emulator_client)
        assert calls["binance /api/v3/ticker/price"] == 2
    finally:
        await rates.aclose()


async def test_an_answer_is_cached_for_a_few_seconds(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
) -> None:
    assert (await get_rate(async_client, "SOL", "USDT")).json()["value"] == 141.23
    upstream.market.books["binance"].set("SOLUSDT", Decimal("150"))
    on_demand_clock.now = ondemand.CACHE_SECONDS - 0.1
    assert (await get_rate(async_client, "SOL", "USDT")).json()["value"] == 141.23
    assert (await upstream_calls(upstream, emulator_client))["binance /api/v3/ticker/price"] == 1
    on_demand_clock.now = ondemand.CACHE_SECONDS + 0.1
    assert (await get_rate(async_client, "SOL", "USDT")).json()["value"] == 150
    assert (await upstream_calls(upstream, emulator_client))["binance /api/v3/ticker/price"] == 2


async def test_it_fails_over_when_the_first_provider_is_down(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    upstream.set_fault("binance", "down")
    body = (await get_rate(async_client, "SOL", "USDT")).json()
    assert (body["provider"], body["value"], body["status"]) == ("bybit", 141.31, "failover")


async def test_a_provider_too_slow_to_answer_hands_over_to_the_next(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ondemand, "REQUEST_TIMEOUT", 0.3)
    # Binance is asked and never answers within the test: an answer at all (bounded, not timed)
    # shows the request was given up on; waiting for Binance would never end.
    upstream.set_fault("binance", "slow", delay=3600)
    body = (await asyncio.wait_for(get_rate(async_client, "SOL", "USDT"), 60)).json()
    assert (body["provider"], body["status"]) == ("bybit", "failover")
    assert (await upstream_calls(upstream, emulator_client))["binance /api/v3/ticker/price"] == 1


async def test_a_quote_failing_validation_is_never_served(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    upstream.set_fault("binance", "absurd", factor="-1")  # negative prices
    body = (await get_rate(async_client, "SOL", "USDT")).json()
    assert (body["provider"], body["value"], body["status"]) == ("bybit", 141.31, "failover")


async def test_it_inverts_a_pair_listed_the_other_way_round(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    body = json.loads((await get_rate(async_client, "RUB", "BTC")).content, parse_float=Decimal)
    # 1 / 7200987.654321 to 24 significant digits (18 places would keep only 11 of them).
    assert body["value"] == Decimal("0.000000138869839528185196012482")
    assert body["value"] == quantized(1 / Decimal("7200987.654321"))
    assert (body["provider"], body["derived"], body["status"]) == ("coingecko", True, "live")
    assert [(leg["pair"], leg["provider"], leg["value"]) for leg in body["route"]] == [
        ("BTC-RUB", "coingecko", Decimal("7200987.654321"))
    ]


async def test_it_derives_a_cross_rate_through_usd_with_its_route(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    # No provider lists BNB-RUB (the emulator's CoinGecko has no binancecoin): BNB-USD from
    # Binance's BNBUSDT market times USD-RUB from the Bank of Russia (80.0000).
    body = json.loads((await get_rate(async_client, "BNB", "RUB")).content, parse_float=Decimal)
    assert body["value"] == Decimal("48040")
    assert (body["provider"], body["derived"], body["stale"]) == ("binance+cbr", True, False)
    assert [(leg["pair"], leg["provider"], leg["value"]) for leg in body["route"]] == [
        ("BNB-USD", "binance", Decimal("600.5")),
        ("USD-RUB", "cbr", Decimal("80")),
    ]
    # The rate is as fresh as its freshest leg says; it goes stale with its stalest one.
    legs = [datetime.fromisoformat(leg["source_time"]) for leg in body["route"]]
    assert datetime.fromisoformat(body["source_time"]) == max(legs)


async def test_it_derives_a_fiat_cross_through_rub_from_the_bank_of_russia(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    body = json.loads((await get_rate(async_client, "AUD", "CAD")).content, parse_float=Decimal)
    # AUD-RUB 52.3107 / CAD-RUB 57.4012, rounded once.
    assert body["value"] == Decimal("0.911317185006585228183383")
    assert body["value"] == quantized(Decimal("52.3107") / Decimal("57.4012"))
    assert (body["pair"], body["provider"], body["derived"]) == ("AUD-CAD", "cbr+cbr", True)
    assert [leg["pair"] for leg in body["route"]] == ["AUD-RUB", "CAD-RUB"]


async def test_an_unpriceable_pair_is_404_and_the_answer_is_cached(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
) -> None:
    response = await get_rate(async_client, "ZZZ", "QQQ")
    assert response.status_code == 404, response.content
    assert "ZZZ-QQQ" in response.json()["detail"]
    calls = sum((await upstream_calls(upstream, emulator_client)).values())
    assert (await get_rate(async_client, "ZZZ", "QQQ")).status_code == 404
    assert sum((await upstream_calls(upstream, emulator_client)).values()) == calls


async def test_a_pair_bybit_refuses_as_unknown_is_404_not_503(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    # Binance and Bybit are asked for the one symbol ZZZUSDT: Bybit answers retCode 10001.
    response = await get_rate(async_client, "ZZZ", "USDT")
    assert response.status_code == 404, response.content


async def test_it_answers_503_when_every_provider_that_could_price_it_fails(
    async_client: AsyncClient, upstream: EmulatorServer, on_demand_clock: FakeClock
) -> None:
    upstream.set_fault("all", "down")
    response = await get_rate(async_client, "SOL", "USDT")
    assert response.status_code == 503, response.content
    detail = response.json()["detail"]
    assert "binance: HTTP 503" in detail
    assert "bybit: HTTP 503" in detail
    # A failed listing is asked again after the listing interval, not at every lookup.
    upstream.set_fault("all", "ok")
    on_demand_clock.now = ondemand.FAILURE_CACHE_SECONDS + 0.1
    assert (await get_rate(async_client, "SOL", "USDT")).status_code == 503
    on_demand_clock.now = ondemand.LISTING_SECONDS
    assert (await get_rate(async_client, "SOL", "USDT")).status_code == 200


# --- Tracked pairs, from the snapshot ------------------------------------------------------------
async def test_a_tracked_pair_comes_from_the_snapshot_without_an_upstream_call(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    on_demand_clock: FakeClock,
    tracked: dict[str, dict[str, Any]],
) -> None:
    checked = timezone.now() - timedelta(seconds=12)
    leg = {
        "pair": "BTC-USD",
        "provider": "binance",
        "value": Decimal("90000"),
        "source_time": checked,
    }
    course = Course(
        direction="BTC-RUB",
        value=Decimal("7200000.123456789012345678"),
        provider="binance+cbr",
        source_time=datetime(2026, 3, 14, tzinfo=UTC),
        checked_at=checked,
        status="failover",
        derived=True,
        version=7,
        route=(leg,),
    )
    tracked["BTC-RUB"] = course.to_dict(timezone.now())
    response = await get_rate(async_client, "btc", "rub")
    assert response.status_code == 200, response.content
    body = json.loads(response.content, parse_float=Decimal)
    assert body == {
        "pair": "BTC-RUB",
        "value": Decimal("7200000.123456789012345678"),
        "provider": "binance+cbr",
        "source_time": "2026-03-14T00:00:00Z",
        "age_s": body["age_s"],
        "derived": True,
        "stale": False,
        "status": "failover",
        "route": [{**leg, "source_time": checked.isoformat().replace("+00:00", "Z")}],
        "mode": "priority",
        "n_sources": 1,
        "dispersion_bps": None,
        "bid": None,
        "ask": None,
        "spread_bps": None,
        "buy": Decimal("7200000.123456789012345678"),
        "sell": Decimal("7200000.123456789012345678"),
    }
    assert 12 <= body["age_s"] < 13  # since the last confirmation, as /courses says
    assert await upstream_calls(upstream, emulator_client) == Counter()


def usdt_rub(value: str, *, age: float, provider: str = "coingecko") -> dict[str, Any]:
    """A USDT-RUB course as the snapshot shows it, last confirmed `age` seconds ago."""
    now = timezone.now()
    return Course(
        direction="USDTTRC-RUB",
        value=Decimal(value),
        provider=provider,
        source_time=now - timedelta(seconds=age),
        checked_at=now - timedelta(seconds=age),
        status="live",
        derived=False,
        version=4,
    ).to_dict(now)


@pytest.mark.usefixtures("on_demand_clock")
async def test_aliases_and_inverses_of_a_tracked_pair_are_served_from_it_even_stale(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    tracked: dict[str, dict[str, Any]],
) -> None:
    # The case: every provider down, the tracked USDTTRC-RUB stale after 130 s. Its
    # alias USDT-RUB and the inverses answered differently (one on demand, 503) before.
    upstream.set_fault("all", "down")
    tracked["USDTTRC-RUB"] = usdt_rub("80.0249616", age=130)
    answers = {}
    for base, quote in [("USDTTRC", "RUB"), ("USDT", "RUB"), ("USDTERC", "RUB")]:
        response = await get_rate(async_client, base, quote)
        assert response.status_code == 200, response.content
        answers[base, quote] = json.loads(response.content, parse_float=Decimal)
    for base, quote in [("RUB", "USDTTRC"), ("RUB", "USDT"), ("RUB", "USDTERC")]:
        response = await get_rate(async_client, base, quote)
        assert response.status_code == 200, response.content
        answers[base, quote] = json.loads(response.content, parse_float=Decimal)
    tracked_answer = answers["USDTTRC", "RUB"]
    inverse = quantized(1 / Decimal("80.0249616"))
    for (base, quote), body in answers.items():
        expected = Decimal("80.0249616") if quote == "RUB" else inverse
        assert body["pair"] == f"{base}-{quote}"
        assert body["value"] == expected, (base, quote)
        assert (body["provider"], body["status"], body["stale"]) == ("coingecko", "stale", True)
        assert body["source_time"] == tracked_answer["source_time"]
        assert body["age_s"] == pytest.approx(tracked_answer["age_s"], abs=1)
        # Inverted, it is a derived rate whose one leg is the tracked pair as quoted.
        assert body["derived"] is (quote != "RUB")
        if quote != "RUB":
            assert [leg["pair"] for leg in body["route"]] == ["USDTTRC-RUB"]
    assert not upstream.market.request_counts  # not one upstream request


async def test_the_pair_itself_then_its_exact_inverse_win_over_an_alias(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    on_demand_clock: FakeClock,
    tracked: dict[str, dict[str, Any]],
) -> None:
    tracked["USDTTRC-RUB"] = usdt_rub("80.5", age=1)
    tracked["USDTERC-RUB"] = {**usdt_rub("79.5", age=1), "direction": "USDTERC-RUB"}

    async def value(base: str, quote: str) -> Decimal:
        response = await get_rate(async_client, base, quote)
        return Decimal(json.loads(response.content, parse_float=Decimal)["value"])

    assert await value("USDTTRC", "RUB") == Decimal("80.5")
    assert await value("USDTERC", "RUB") == Decimal("79.5")
    assert await value("RUB", "USDTTRC") == quantized(1 / Decimal("80.5"))
    assert await value("RUB", "USDTERC") == quantized(1 / Decimal("79.5"))
    # Plain USDT is an alias of both: the first tracked code in order serves it, both ways.
    assert await value("USDT", "RUB") == Decimal("79.5")
    assert await value("RUB", "USDT") == quantized(1 / Decimal("79.5"))


async def test_a_round_trip_through_convert_returns_the_amount_with_coingecko_down(
    async_client: AsyncClient,
    upstream: EmulatorServer,
    on_demand_clock: FakeClock,
    tracked: dict[str, dict[str, Any]],
) -> None:
    # BTC-RUB tracked (Binance × the bank) while CoinGecko, the only direct RUB source, is down:
    # the way back used to be priced on demand by another route and lost 1.34 %.
    upstream.set_fault("coingecko", "down")
    now = timezone.now()
    tracked["BTC-RUB"] = Course(
        direction="BTC-RUB",
        value=Decimal("7104000.123456789012345678"),
        provider="binance+cbr",
        source_time=now,
        checked_at=now,
        status="failover",
        derived=True,
        version=9,
        route=(
            {
                "pair": "BTC-USD",
                "provider": "binance",
                "value": Decimal("88800"),
                "source_time": now,
            },
            {"pair": "USD-RUB", "provider": "cbr", "value": Decimal("80"), "source_time": now},
        ),
    ).to_dict(now)
    for amount in ["0.5", "1", "0.000123", "12345.678901234567890123"]:
        there = await async_client.get(f"/api/v1/convert?from=BTC&to=RUB&amount={amount}")
        rub = json.loads(there.content, parse_float=Decimal)
        back = await async_client.get(f"/api/v1/convert?from=RUB&to=BTC&amount={rub['result']}")
        assert back.status_code == 200, back.content
        btc = json.loads(back.content, parse_float=Decimal)
        # Within the precision: half a step of the RUB result divided by the rate, half a step.
        assert abs(btc["result"] - Decimal(amount)) <= STEP, (amount, btc["result"])
        assert (btc["provider"], btc["status"]) == (rub["provider"], rub["status"])
        assert btc["rate"] == quantized(1 / Decimal("7104000.123456789012345678"))
        assert [leg["pair"] for leg in btc["route"]] == ["BTC-USD", "USD-RUB"]
    assert not upstream.market.request_counts  # not one upstream request


# --- Input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("B/USD", "base"),
        ("BTC/ABCDEFGHIJKLM", "quote"),
        ("BT%24/USD", "base"),
        ("BTC/US%20D", "quote"),
        ("BTC/btc", "quote"),
        ("%C3%A9TH/USD", "base"),
    ],
)
def test_a_malformed_asset_is_422_naming_it(client: Client, path: str, field: str) -> None:
    response = client.get(f"/api/v1/rates/{path}")
    assert response.status_code == 422, response.content
    assert [error["field"] for error in response.json()["errors"]] == [field]


def test_routes_go_inverted_then_through_usd_usdt_and_rub() -> None:
    def via(route: ondemand.Route) -> str:
        (pair, inverted), _ = route
        return pair.base if inverted else pair.quote

    routes = derivation_routes(Pair("AUD", "CAD"))
    assert routes[0] == ((Pair("CAD", "AUD"), True),)
    assert routes[1] == ((Pair("AUD", "USD"), False), (Pair("USD", "CAD"), False))
    assert routes[4] == ((Pair("USD", "AUD"), True), (Pair("CAD", "USD"), True))
    assert list(dict.fromkeys(via(route) for route in routes[1:])) == ["USD", "USDT", "RUB"]
    # Never through one of the pair's own assets: BTC-USDT goes through USD and RUB only.
    assert {via(route) for route in derivation_routes(Pair("BTC", "USDT"))[1:]} == {"USD", "RUB"}


def test_the_openapi_schema_declares_the_answers(client: Client) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    answers = spec["paths"]["/api/v1/rates/{base}/{quote}"]["get"]["responses"]
    assert "content" not in answers.pop("304")  # `If-None-Match` at an instant
    refs = {
        code: answer["content"]["application/json"]["schema"] for code, answer in answers.items()
    }
    assert refs == {
        # The rate now, or at an instant (`at`: docs/api.md#point-in-time).
        "200": {
            "anyOf": [
                {"$ref": "#/components/schemas/PairRateOut"},
                {"$ref": "#/components/schemas/PairRateAtOut"},
            ],
            "title": "Response",
        },
        "404": {"$ref": "#/components/schemas/ErrorOut"},
        "422": {"$ref": "#/components/schemas/ValidationErrorOut"},
        "429": {"$ref": "#/components/schemas/ErrorOut"},
        "503": {"$ref": "#/components/schemas/ErrorOut"},
    }
    rate = spec["components"]["schemas"]["PairRateOut"]
    assert rate["properties"]["value"]["type"] == "number"  # JSON numbers, not strings
    assert set(rate["required"]) >= {"pair", "value", "provider", "source_time", "age_s"}


async def test_an_unpriceable_lookup_raises_not_priced_without_calling_anyone(
    upstream: EmulatorServer, emulator_client: httpx.AsyncClient, settings: Any
) -> None:
    settings.KURS_PROVIDERS = ["cbr"]  # the bank quotes X-RUB only
    rates = ondemand.OnDemandRates(clock=FakeClock())
    try:
        with pytest.raises(PairNotPriced):
            await rates.get(Pair("BTC", "ETH"))
        assert await upstream_calls(upstream, emulator_client) == Counter()
    finally:
        await rates.aclose()


def test_a_cached_rate_still_ages(monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime(2026, 3, 14, tzinfo=UTC)
    rate = ondemand.PairRate(
        pair="SOL-USDT",
        value=Decimal("141"),
        provider="binance",
        source_time=now,
        fresh_until=now + timedelta(seconds=30),
        derived=False,
        failover=False,
    )
    assert rate.to_dict(now + timedelta(seconds=3))["age_s"] == 3
    late = rate.to_dict(now + timedelta(seconds=31))
    assert (late["stale"], late["status"]) == (True, "stale")


def test_tracked_sources_put_the_pair_itself_first_and_identities_answer_only_for_themselves(
    tracked: dict[str, dict[str, Any]],
) -> None:
    for code in ["USDTERC-RUB", "USDTTRC-RUB", "RUB-USDT", "USDTTRC-USDT", "BTC-RUB"]:
        tracked[code] = {}
    assert ondemand.tracked_sources(Pair("USDTTRC", "RUB")) == [
        ("USDTTRC-RUB", False),
        ("USDTERC-RUB", False),
        ("RUB-USDT", True),
    ]
    assert ondemand.tracked_sources(Pair("RUB", "USDTTRC")) == [
        ("USDTTRC-RUB", True),
        ("RUB-USDT", False),
        ("USDTERC-RUB", True),
    ]
    assert ondemand.tracked_sources(Pair("USDTTRC", "USDT")) == [("USDTTRC-USDT", False)]
    assert ondemand.tracked_sources(Pair("USDTERC", "USDT")) == []
    assert ondemand.tracked_sources(Pair("ETH", "RUB")) == []
