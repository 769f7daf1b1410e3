"""Consensus pricing: the pure rule (rates/consensus.py) and the one decide step that calls it,
on the real database (docs/rates.md#consensus-pricing)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY

from items.models import Item
from rates import consensus, policy, services
from rates.models import CurrentRate, Rate
from rates.tests.support import make_quote

NOW = timezone.now()
D = Decimal


def source(provider: str, value: str, bid: str | None = None, ask: str | None = None) -> Any:
    return consensus.Source(
        provider,
        D(value),
        None if bid is None else D(bid),
        None if ask is None else D(ask),
        NOW,
    )


def excluded(priced: consensus.Priced) -> list[str]:
    return [s.provider for s in priced.excluded]


# --- The rule ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values",
    [
        # Binance and Bybit BTCUSDT a few bp apart, CoinGecko's USD price 16 bp below (USDT's
        # premium and its 60 s cache).
        ("97000.12", "97003.50", "96850.00"),
        # A fast minute: CoinGecko's cached price 0.9 % behind the exchanges.
        ("97000.00", "97012.00", "96127.00"),
        # The exchanges themselves 0.3 % apart, CoinGecko between them.
        ("97000.00", "97291.00", "97150.00"),
    ],
)
def test_a_normal_spread_between_binance_bybit_and_coingecko_excludes_nobody(
    values: tuple[str, str, str],
) -> None:
    priced = consensus.price(
        [
            source(name, value)
            for name, value in zip(("binance", "bybit", "coingecko"), values, strict=True)
        ],
        places=18,
    )
    assert excluded(priced) == []
    assert priced.n_sources == 3
    assert priced.value == sorted(D(value) for value in values)[1]


@pytest.mark.parametrize("skew", ["1.02", "0.98", "1.05", "0.5", "2"])
@pytest.mark.parametrize("skewed", ["binance", "bybit", "coingecko"])
def test_one_source_off_by_two_percent_or_more_among_three_is_excluded(
    skewed: str, skew: str
) -> None:
    honest = {"binance": D("97000.00"), "bybit": D("97010.00"), "coingecko": D("96990.00")}
    values = {name: value * D(skew) if name == skewed else value for name, value in honest.items()}
    priced = consensus.price([source(name, str(v)) for name, v in values.items()], places=18)
    assert excluded(priced) == [skewed]
    assert priced.sources[-1].reason == consensus.OUTLIER
    assert priced.n_sources == 2
    assert priced.value == consensus.median([v for n, v in honest.items() if n != skewed])


def test_two_percent_off_is_excluded_even_beside_a_thirty_bp_honest_spread() -> None:
    priced = consensus.price(
        [source("binance", "100"), source("bybit", "100.3"), source("coingecko", "102.3")],
        places=18,
    )
    assert excluded(priced) == ["coingecko"]


def test_two_sources_never_exclude_each_other_nor_one_itself() -> None:
    two = consensus.price([source("binance", "100"), source("bybit", "110")], places=18)
    assert excluded(two) == []
    assert two.value == D("105")
    assert two.dispersion_bps == D("238.10")  # (110 - 100) / 2 / 2 / 105 × 10,000
    one = consensus.price([source("binance", "100")], places=18)
    assert (one.value, one.n_sources, one.dispersion_bps) == (D("100"), 1, None)


def test_bid_and_ask_are_medians_of_the_included_sources_that_have_them() -> None:
    priced = consensus.price(
        [
            source("binance", "100", bid="99.9", ask="100.1"),
            source("bybit", "100.02", bid="99.95", ask="100.05"),
            source("coingecko", "100.01"),
            source("other", "150", bid="149", ask="151"),
        ],
        places=18,
    )
    assert excluded(priced) == ["other"]
    assert (priced.bid, priced.ask) == (D("99.925"), D("100.075"))
    assert consensus.spread_bps(priced.bid, priced.ask, priced.value) == D("15.00")


def test_an_even_median_is_rounded_once_to_the_stored_places() -> None:
    priced = consensus.price([source("a", "0.01"), source("b", "0.02")], places=2)
    assert priced.value == D("0.02")  # 0.015 half-even to 2 places


def test_dispersion_is_half_the_interquartile_range_in_bp() -> None:
    values = [D("100"), D("101"), D("102"), D("103")]
    # quartiles 100.75 and 102.25 (linear), half their distance 0.75 of 101.5
    assert consensus.dispersion_bps(values, D("101.5")) == D("73.89")


# --- The decide step, on the database ----------------------------------------------------------


def consensus_item(code: str = "BTC-USD") -> Item:
    return tracked(code, "consensus")


def tracked(code: str, pricing: str | None) -> Item:
    base, quote = code.split("-")
    return Item.objects.update_or_create(
        base=base, quote=quote, defaults={"is_active": True, "pricing": pricing}
    )[0]


def accept(quote: Any, capture: Any) -> services.Acceptance:
    with capture(execute=True):
        return services.accept_quote(quote)


def excluded_count(provider: str) -> float:
    labels = {"provider": provider, "reason": "outlier"}
    return REGISTRY.get_sample_value("kurs_quotes_excluded_total", labels) or 0.0


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_consensus_item_serves_the_median_and_excludes_a_skewed_source(
    django_capture_on_commit_callbacks: Any, published_events: Any
) -> None:
    item = consensus_item()
    accept(
        make_quote("binance", "BTC-USD", "97000", bid="96999", ask="97001"),
        django_capture_on_commit_callbacks,
    )
    row = CurrentRate.objects.get(item=item)
    # One source: its value, but `thin` (KURS_CONSENSUS_MIN_SOURCES is 2).
    assert (row.provider, row.value, row.status, row.mode, row.n_sources) == (
        "consensus",
        D("97000"),
        policy.THIN,
        "consensus",
        1,
    )
    assert row.dispersion_bps is None
    accept(
        make_quote("bybit", "BTC-USD", "97010", bid="97009", ask="97011"),
        django_capture_on_commit_callbacks,
    )
    accept(make_quote("coingecko", "BTC-USD", "97020"), django_capture_on_commit_callbacks)
    row.refresh_from_db()
    assert (row.value, row.status, row.n_sources) == (D("97010"), policy.LIVE, 3)
    assert (row.bid, row.ask) == (D("97004"), D("97006"))
    assert row.dispersion_bps == D("0.52")  # 10 / 2 / 97010 × 10,000
    before = excluded_count("bybit")
    published_events.clear()
    # Bybit goes 5 % off: plausible (inside KURS_MAX_JUMP), and out of the consensus.
    accept(make_quote("bybit", "BTC-USD", "101860.5"), django_capture_on_commit_callbacks)
    row.refresh_from_db()
    assert (row.value, row.n_sources, row.status) == (D("97010"), 2, policy.LIVE)
    assert [(s["provider"], s["excluded"], s["reason"]) for s in row.sources] == [
        ("binance", False, None),
        ("coingecko", False, None),
        ("bybit", True, "outlier"),
    ]
    kinds = {envelope["type"]: envelope["data"] for _, envelope in published_events}
    assert kinds["quote.excluded"] == {
        "direction": "BTC-USD",
        "provider": "bybit",
        "value": D("101860.5"),
        "median": D("97010"),
        "reason": "outlier",
    }
    assert kinds["rate.updated"]["n_sources"] == 2
    assert excluded_count("bybit") == before + 1
    # Still off on its next quote: no second event, no second count.
    published_events.clear()
    accept(make_quote("bybit", "BTC-USD", "101861"), django_capture_on_commit_callbacks)
    assert [e["type"] for _, e in published_events if e["type"] == "quote.excluded"] == []
    assert excluded_count("bybit") == before + 1
    # History keeps each provider's quotes and the served value with its evidence.
    served = Rate.objects.filter(item=item, provider="consensus").order_by("-id").first()
    assert served is not None
    # (stored when 97010 was first served, by three sources; an unchanged value is stored
    # again after 60 s, docs/rates.md#history)
    assert (served.value, served.mode, served.n_sources) == (D("97010"), "consensus", 3)
    assert served.dispersion_bps == D("0.52")


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_fewer_agreeing_sources_than_the_minimum_is_thin(
    settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.KURS_CONSENSUS_MIN_SOURCES = 3
    item = consensus_item()
    for name, value in (("binance", "100"), ("bybit", "100.01"), ("coingecko", "100.02")):
        accept(make_quote(name, "BTC-USD", value), django_capture_on_commit_callbacks)
    assert CurrentRate.objects.get(item=item).status == policy.LIVE
    accept(make_quote("coingecko", "BTC-USD", "103"), django_capture_on_commit_callbacks)
    row = CurrentRate.objects.get(item=item)
    assert (row.status, row.n_sources, row.value) == (policy.THIN, 2, D("100.005"))


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_the_default_pricing_is_the_setting_and_an_item_overrides_it(
    settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.KURS_PRICING = "consensus"
    by_default = tracked("BTC-USD", None)
    by_priority = tracked("ETH-USD", "priority")
    for name, btc_value, eth_value in (("binance", "100", "10"), ("bybit", "102", "10.2")):
        accept(make_quote(name, "BTC-USD", btc_value), django_capture_on_commit_callbacks)
        accept(make_quote(name, "ETH-USD", eth_value), django_capture_on_commit_callbacks)
    btc = CurrentRate.objects.get(item=by_default)
    eth = CurrentRate.objects.get(item=by_priority)
    assert (btc.provider, btc.value, btc.n_sources, btc.dispersion_bps) == (
        "consensus",
        D("101"),
        2,
        D("49.50"),
    )
    assert (eth.provider, eth.value, eth.mode, eth.n_sources, eth.dispersion_bps) == (
        "binance",
        D("10"),
        "priority",
        1,
        None,
    )
    # Under priority the other sources are listed, left out by priority (as of the version:
    # Bybit's quote alone was no news, Binance's next one is).
    accept(make_quote("binance", "ETH-USD", "10.1"), django_capture_on_commit_callbacks)
    eth.refresh_from_db()
    assert [(s["provider"], s["reason"]) for s in eth.sources] == [
        ("binance", None),
        ("bybit", "priority"),
    ]


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_consensus_pair_goes_stale_when_every_source_is_old(
    django_capture_on_commit_callbacks: Any,
) -> None:
    item = consensus_item()
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "100.1"), django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        services.reevaluate(now=timezone.now() + timedelta(seconds=200))
    row = CurrentRate.objects.get(item=item)
    assert (row.status, row.value) == (policy.STALE, D("100.05"))


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_new_owner_loads_a_consensus_rate_without_taking_it_for_a_source(
    django_capture_on_commit_callbacks: Any,
) -> None:
    consensus_item()
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "100.1"), django_capture_on_commit_callbacks)
    board = services.get_board()
    services.board_load(board=board)
    state = board.state("BTC-USD", now=timezone.now())
    assert state.usable == ()
    assert state.current is not None
    assert state.current.sources[0]["provider"] == "binance"
