"""Pegs (docs/rates.md#pegs): the pure rules, then the owner's whole path against the emulator's
`depeg` scenario (real HTTP, the database, the shared cache, events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient
from django.utils import timezone
from prometheus_client import REGISTRY

from items.models import Item
from rates import pegs
from rates.board import Entry
from rates.emulator import EmulatorServer
from rates.fetcher import Fetcher
from rates.models import CurrentRate
from rates.pegs import BROKEN, OK, UNKNOWN, Peg, PegState
from rates.tests.conftest_emulator import make_provider
from rates.tests.support import point_settings_at

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.get_current_timezone())
USDT = Peg("USDT", "USD", Decimal("0.01"))


def entry(provider: str, value: str, *, proxied: bool = False, derived: bool = False) -> Entry:
    return Entry(
        provider=provider,
        value=Decimal(value),
        source_time=T0,
        fresh_until=T0 + timedelta(seconds=30),
        priority=(0, 0),
        proxied=proxied,
        derived=derived,
    )


def board(**pairs: dict[str, Entry]) -> dict[str, dict[str, Entry]]:
    return {pair.replace("_", "-"): entries for pair, entries in pairs.items()}


# --- measuring ---------------------------------------------------------------------------------
def test_the_evidence_is_the_direct_quote_and_the_premium_of_a_coin_in_both() -> None:
    quotes = board(
        USDTTRC_USD={"coingecko": entry("coingecko", "0.9703")},
        USDT_USD={"coingecko": entry("coingecko", "0.9703")},  # the same source, said once
        BTC_USD={
            "binance": entry("binance", "92800", proxied=True),  # BTCUSDT served as BTC-USD
            "coingecko": entry("coingecko", "90016"),
            "binance+coingecko": entry("binance+coingecko", "90044", derived=True),  # not seen
        },
        BTC_USDT={"binance": entry("binance", "92800"), "bybit": entry("bybit", "92820")},
    )
    found = pegs.observe(USDT, quotes, now=T0, proxy="USDT")
    assert [(o.source, o.value) for o in found] == [
        ("coingecko USDT-USD", Decimal("0.9703")),
        ("BTC-USD / binance BTC-USDT", Decimal("0.97000000")),
        ("BTC-USD / bybit BTC-USDT", Decimal("0.96979099")),
    ]
    assert pegs.measure(found) == Decimal("0.970000")


def test_stale_quotes_are_no_evidence_and_none_is_unknown() -> None:
    quotes = board(USDT_USD={"coingecko": entry("coingecko", "0.97")})
    assert pegs.observe(USDT, quotes, now=T0 + timedelta(seconds=31), proxy="USDT") == []
    assert pegs.measure([]) is None


def test_without_the_usd_proxy_a_usd_quote_is_true_not_tether() -> None:
    quotes = board(
        BTC_USD={"coingecko": entry("coingecko", "90000"), "kraken": entry("kraken", "90010")},
        BTC_USDT={"binance": entry("binance", "90000")},
    )
    found = pegs.observe(USDT, quotes, now=T0, proxy="")
    assert [o.source for o in found] == ["BTC-USD / binance BTC-USDT"]
    assert found[0].value == Decimal("1.00005556")  # the median true price over binance's


@pytest.mark.parametrize("proxy", ["USDT", ""])
def test_the_pairs_a_peg_uses_are_all_its_evidence_comes_from(proxy: str) -> None:
    quotes = board(
        USDT_USD={"coingecko": entry("coingecko", "0.9703")},
        USD_USDT={"kraken": entry("kraken", "1.03")},
        BTC_USD={
            "binance": entry("binance", "92800", proxied=True),
            "coingecko": entry("coingecko", "90016"),
        },
        BTC_USDT={"binance": entry("binance", "92800")},
        ETH_USDT={"binance": entry("binance", "3100")},  # no true ETH-USD: no evidence
        # No SOL in USDT: none either (through the proxy, a USD pair may hold both quotes).
        SOL_USD={"coingecko": entry("coingecko", "140")},
        BTC_EUR={"kraken": entry("kraken", "85000")},
    )
    used = pegs.used_pairs(USDT, quotes, proxy=proxy)
    assert used == {"USDT-USD", "USD-USDT", "BTC-USD", "BTC-USDT"} | (
        {"SOL-USD"} if proxy else set()
    )
    subset = {pair: quotes[pair] for pair in used}
    assert pegs.observe(USDT, subset, now=T0, proxy=proxy) == pegs.observe(
        USDT, quotes, now=T0, proxy=proxy
    )
    assert len(pegs.observe(USDT, quotes, now=T0, proxy=proxy)) >= 3


# --- the state machine -------------------------------------------------------------------------
def run(values: list[str | None], *, every: float = 1.0) -> list[PegState]:
    state, states = PegState(USDT), []
    for number, value in enumerate(values):
        now = T0 + timedelta(seconds=every * number)
        state = pegs.step(state, None if value is None else Decimal(value), (), now=now)
        states.append(state)
    return states


def test_a_peg_breaks_at_the_first_measurement_outside_its_band() -> None:
    states = run([None, "1.002", "0.995", "0.97"])
    assert [s.state for s in states] == [UNKNOWN, OK, OK, BROKEN]
    assert states[3].since == T0 + timedelta(seconds=3)
    assert states[3].deviation == Decimal("-0.03")
    assert states[2].since == states[1].since  # ok since it was first measured
    assert pegs.transition(states[2], states[3]) == "peg.broken"


def test_a_peg_at_the_edge_of_its_band_does_not_flap() -> None:
    # Broken, then hovering just inside the band: still broken (it must come within half of it).
    states = run(["0.985", "0.991", "0.989", "0.992", "0.989"])
    assert {s.state for s in states} == {BROKEN}
    changes = [pegs.transition(a, b) for a, b in pairwise(states)]
    assert changes == [None] * 4


def test_a_broken_peg_is_restored_only_after_holding_near_parity() -> None:
    hold = int(pegs.RESTORE_HOLD.total_seconds())
    states = run(["0.97", *["0.999"] * hold, "0.999"])
    assert [s.state for s in states[: hold + 1]] == [BROKEN] * (hold + 1)
    assert states[-1].state == OK
    assert pegs.transition(states[-2], states[-1]) == "peg.restored"
    # A relapse during the hold starts it again.
    relapse = run(["0.97", "0.999", "0.97", *["0.999"] * hold])
    assert relapse[-1].state == BROKEN


def test_a_broken_peg_without_evidence_stays_broken_at_its_last_value() -> None:
    states = run(["0.97", None, None])
    assert [s.state for s in states] == [BROKEN] * 3
    assert states[-1].value == Decimal("0.97")
    assert [s.state for s in run(["1.0", None])] == [OK, UNKNOWN]


# --- pricing through a peg ---------------------------------------------------------------------
def test_a_proxied_rate_through_a_broken_peg_is_converted_and_says_so() -> None:
    broken = pegs.step(PegState(USDT), Decimal("0.97"), (), now=T0)
    proxied = entry("binance", "92783.51", proxied=True)
    converted, status = pegs.through("BTC-USD", proxied, "live", broken)
    assert status == "depeg"
    assert converted.value == Decimal("90000.0047")
    assert converted.derived
    assert [(leg["pair"], leg["provider"], leg["value"]) for leg in converted.route] == [
        ("BTC-USDT", "binance", Decimal("92783.51")),
        ("USDT-USD", "peg", Decimal("0.97")),
    ]
    # A cross rate keeps its legs and adds the peg's.
    cross = Entry(
        **{
            **vars_of(entry("binance+cbr", "7422680.8", proxied=True)),
            "route": (
                {
                    "pair": "BTC-USD",
                    "provider": "binance",
                    "value": Decimal("92783.51"),
                    "source_time": T0,
                },
                {"pair": "USD-RUB", "provider": "cbr", "value": Decimal("80"), "source_time": T0},
            ),
        }
    )
    assert [leg["pair"] for leg in pegs.through("BTC-RUB", cross, "live", broken)[0].route] == [
        "BTC-USD",
        "USD-RUB",
        "USDT-USD",
    ]


def vars_of(value: Entry) -> dict[str, Any]:
    return {name: getattr(value, name) for name in Entry.__slots__}


@pytest.mark.parametrize("state", [OK, UNKNOWN])
def test_inside_the_band_or_unmeasured_the_proxy_applies_as_before(state: str) -> None:
    peg = PegState(USDT, state=state, value=Decimal("0.995") if state == OK else None)
    proxied = entry("binance", "92783.51", proxied=True)
    assert pegs.through("BTC-USD", proxied, "live", peg) == (proxied, "live")


def test_a_true_quote_is_never_converted() -> None:
    broken = pegs.step(PegState(USDT), Decimal("0.97"), (), now=T0)
    true = entry("coingecko", "90000")
    assert pegs.through("BTC-USD", true, "failover", broken) == (true, "failover")


# --- the owner, against the emulator's depeg ---------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as http:
        yield http
    await sync_to_async(connections.close_all)()


def track(*codes: str) -> None:
    Item.objects.all().delete()
    for code in codes:
        base, quote = code.split("-")
        Item.objects.create(base=base, quote=quote)


def peg_gauge() -> float | None:
    return REGISTRY.get_sample_value("kurs_peg_state", {"peg": "USDT-USD"})


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("rate_settings", "fresh_board", "on_demand_clock")
async def test_a_depeg_converts_what_the_proxy_serves_and_everyone_hears_it(
    emulator: EmulatorServer,
    client: httpx.AsyncClient,
    published_events: list[tuple[str, dict[str, Any]]],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.KURS_PEGS = [("USDT", "USD", Decimal("0.01"))]
    point_settings_at(settings, emulator)
    await sync_to_async(track)("BTC-USD", "USDTTRC-USD")
    names = ("binance", "bybit", "coingecko")
    fetcher = Fetcher(
        [make_provider(name, emulator, client) for name in names], poll_interval=1, round_timeout=1
    )
    web = AsyncClient()
    true_btc = emulator.market.books["coingecko"].prices["bitcoin.usd"]

    await fetcher.cycle()
    btc = await CurrentRate.objects.aget(item__code="BTC-USD")
    assert (btc.provider, btc.status) == ("binance", "live")
    assert peg_gauge() == 0
    (peg,) = (await web.get("/api/v1/pegs")).json()
    assert (peg["state"], peg["band"]) == ("ok", 0.01)

    emulator.set_depeg("0.97")
    await fetcher.cycle()  # one poll
    btc = await CurrentRate.objects.aget(item__code="BTC-USD")
    assert btc.status == "depeg"
    assert btc.provider == "binance"
    assert abs(btc.value / true_btc - 1) < Decimal("0.002")
    assert btc.route[-1]["pair"] == "USDT-USD"
    assert btc.route[-1]["provider"] == "peg"
    usdt = await CurrentRate.objects.aget(item__code="USDTTRC-USD")
    assert (usdt.provider, usdt.status) == ("coingecko", "live")  # a true quote: untouched
    (broken,) = [e["data"] for _, e in published_events if e["type"] == "peg.broken"]
    assert (broken["asset"], broken["reference"], broken["band"]) == (
        "USDT",
        "USD",
        Decimal("0.01"),
    )
    assert abs(broken["value"] - Decimal("0.97")) < Decimal("0.001")
    assert {"coingecko USDT-USD", "BTC-USD / binance BTC-USDT"} <= {
        o["source"] for o in broken["evidence"]
    }
    rate = [
        e["data"]
        for _, e in published_events
        if e["type"] == "rate.updated" and e["data"]["direction"] == "BTC-USD"
    ][-1]
    assert rate["status"] == "depeg"
    assert peg_gauge() == 1
    (peg,) = (await web.get("/api/v1/pegs")).json()
    assert peg["state"] == "broken"
    assert abs(peg["deviation"] + 0.03) < 0.001
    health = (await web.get("/api/v1/health")).json()
    assert health["components"]["pegs"]["status"] == "degraded"
    assert health["status"] != "ok"
    latest = (await web.get(f"/api/v1/items/{btc.item_id}/rates/latest")).json()
    assert latest["status"] == "depeg"
    # An untracked pair through the proxy, priced on demand by the web: converted too.
    true_eth = emulator.market.books["coingecko"].prices["ethereum.usd"]
    for path in ("/api/v1/rates/ETH/USD", "/api/v1/convert?from=ETH&to=USD&amount=1"):
        eth = json.loads((await web.get(path)).content, parse_float=Decimal)
        assert eth["status"] == "depeg", eth
        assert abs(eth.get("value", eth.get("rate")) / true_eth - 1) < Decimal("0.002")
        assert [leg["provider"] for leg in eth["route"]] == ["binance", "peg"]

    # Back at parity: restored once the hold has passed (no wait here), and served live again.
    monkeypatch.setattr(pegs, "RESTORE_HOLD", timedelta(0))
    emulator.set_depeg("1")
    await fetcher.cycle()
    btc = await CurrentRate.objects.aget(item__code="BTC-USD")
    assert (btc.status, btc.derived) == ("live", False)
    assert btc.value == emulator.market.books["binance"].prices["BTCUSDT"]
    assert [e["type"] for _, e in published_events if e["type"].startswith("peg.")] == [
        "peg.broken",
        "peg.restored",
    ]
    assert (await web.get("/api/v1/pegs")).json()[0]["state"] == "ok"


def test_an_on_demand_answer_divided_by_a_proxied_leg_is_divided_by_the_peg() -> None:
    broken = pegs.step(PegState(USDT), Decimal("0.97"), (), now=T0)
    answer = {
        "pair": "USD-ETH",
        "value": Decimal("0.000323333333333333"),  # 1 / ETH-USD from ETHUSDT 3092.78
        "provider": "binance",
        "source_time": T0,
        "stale": False,
        "status": "live",
        "derived": True,
        "route": [{"pair": "ETH-USD", "provider": "binance", "value": 3092, "source_time": T0}],
    }
    converted = pegs.convert_answer(answer, -1, broken)
    assert converted["value"] == Decimal("0.000333333333333333")  # ÷ 0.97
    assert converted["status"] == "depeg"
    assert converted["route"][-1]["pair"] == "USDT-USD"
    assert pegs.convert_answer({**answer, "stale": True}, -1, broken)["status"] == "live"
    assert pegs.convert_answer(answer, -1, PegState(USDT, state=OK)) is answer
