from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import OperationalError
from django.utils import timezone
from prometheus_client import REGISTRY

from items.models import Item
from rates import metrics, policy, services
from rates.board import QuoteBoard
from rates.models import RATE_ROWS, CurrentRate, Rate
from rates.tests.support import make_quote, rate_events, store_current

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("rate_settings", "fresh_board")]

Events = list[tuple[str, dict[str, Any]]]


def item(code: str, *, is_active: bool = True) -> Item:
    base, quote = code.split("-")
    return Item.objects.update_or_create(base=base, quote=quote, defaults={"is_active": is_active})[
        0
    ]


def accept(quote: Any, capture: Any, **kwargs: Any) -> services.Acceptance:
    with capture(execute=True):
        return services.accept_quote(quote, **kwargs)


def fail_binance_over_to_bybit(capture: Any) -> int:
    """BTC-USD quoted by binance (100, serving) and bybit (101), then binance goes down: the
    number of pairs that flipped (its events published)."""
    item("BTC-USD")
    accept(make_quote("binance", "BTC-USD", "100"), capture)
    accept(make_quote("bybit", "BTC-USD", "101"), capture)
    services.provider_set_down("binance", True)
    with capture(execute=True):
        return services.reevaluate()


def rejected(provider: str, reason: str) -> float:
    labels = {"provider": provider, "reason": reason}
    return REGISTRY.get_sample_value("kurs_quotes_rejected_total", labels) or 0.0


def test_an_accepted_quote_is_stored_with_exact_decimals(
    django_capture_on_commit_callbacks: Any,
) -> None:
    btc = item("BTC-USD")
    quote = make_quote(
        "binance",
        "BTC-USD",
        "54000.123456789012345678",
        bid="54000.000000000000000001",
        ask="54001.999999999999999999",
    )
    result = accept(quote, django_capture_on_commit_callbacks)
    assert result.accepted
    assert result.stored
    rate = Rate.objects.get(item=btc)
    assert rate.value == Decimal("54000.123456789012345678")
    assert rate.bid == Decimal("54000.000000000000000001")
    assert rate.ask == Decimal("54001.999999999999999999")
    assert rate.provider == "binance"
    assert rate.source_time == quote.source_time
    assert rate.derived is False


def test_an_unchanged_value_is_stored_again_only_after_60_seconds(
    django_capture_on_commit_callbacks: Any,
) -> None:
    btc = item("BTC-USD")
    start = timezone.now()
    for offset, value in [(0, "100"), (30, "100"), (59, "100"), (60, "100"), (61, "100.5")]:
        moment = start + timedelta(seconds=offset)
        accept(
            make_quote("binance", "BTC-USD", value, now=moment),
            django_capture_on_commit_callbacks,
            now=moment,
        )
    stored = list(Rate.objects.filter(item=btc).order_by("received_at"))
    assert [rate.received_at - start for rate in stored] == [
        timedelta(0),
        timedelta(seconds=60),
        timedelta(seconds=61),
    ]
    assert [rate.value for rate in stored] == [Decimal(100), Decimal(100), Decimal("100.5")]


def test_the_60_second_rule_is_per_provider(django_capture_on_commit_callbacks: Any) -> None:
    btc = item("BTC-USD")
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    assert sorted(Rate.objects.filter(item=btc).values_list("provider", flat=True)) == [
        "binance",
        "bybit",
    ]


def test_a_lower_priority_provider_is_stored_but_not_published_while_the_first_serves(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    item("BTC-USD")
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    result = accept(make_quote("bybit", "BTC-USD", "101"), django_capture_on_commit_callbacks)
    assert result.stored
    assert not result.published
    assert [event["provider"] for event in rate_events(published_events)] == ["binance"]


def test_the_rate_updated_event_carries_the_spec_fields(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    item("ETH-USD")
    quote = make_quote("binance", "ETH-USD", "3000.10")
    accept(quote, django_capture_on_commit_callbacks)
    ((subject, envelope),) = published_events
    assert subject.endswith(".rates.ETH-USD")
    assert envelope["data"] == {
        "direction": "ETH-USD",
        "value": Decimal("3000.10"),
        "provider": "binance",
        "source_time": quote.source_time,
        "checked_at": quote.source_time,
        "status": "live",
        "derived": False,
        "route": [],
        "version": 1,
        "mode": "priority",
        "n_sources": 1,
        "dispersion_bps": None,
        "bid": None,
        "ask": None,
        "spread_bps": None,
        "sources": [
            {
                "provider": "binance",
                "value": Decimal("3000.10"),
                "bid": None,
                "ask": None,
                "source_time": quote.source_time,
                "excluded": False,
                "reason": None,
            }
        ],
    }


def test_no_event_leaves_before_the_transaction_commits(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    item("ETH-USD")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.accept_quote(make_quote("binance", "ETH-USD", "3000"))
    assert published_events == []
    assert len(callbacks) == 1


def test_when_the_serving_provider_goes_down_the_next_one_is_published_at_once(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    assert fail_binance_over_to_bybit(django_capture_on_commit_callbacks) == 1
    events = rate_events(published_events)
    assert [(e["provider"], e["value"], e["status"]) for e in events] == [
        ("binance", Decimal(100), "live"),
        ("bybit", Decimal(101), "failover"),
    ]
    assert [e["version"] for e in events] == [1, 2]
    current = CurrentRate.objects.get(item__code="BTC-USD")
    assert (current.provider, current.status, current.version) == ("bybit", "failover", 2)
    services.provider_set_down("binance", False)
    accept(make_quote("binance", "BTC-USD", "100.2"), django_capture_on_commit_callbacks)
    last = rate_events(published_events)[-1]
    assert (last["provider"], last["status"], last["version"]) == ("binance", "live", 3)


def test_a_failover_is_counted_once_and_the_status_and_age_gauges_follow_the_pair(
    django_capture_on_commit_callbacks: Any,
) -> None:
    item("BTC-USD")

    def failovers() -> float:
        labels = {"pair": "BTC-USD", "provider": "bybit"}
        return REGISTRY.get_sample_value("kurs_failovers_total", labels) or 0.0

    def status() -> float | None:
        return REGISTRY.get_sample_value("kurs_rate_status", {"pair": "BTC-USD"})

    before = failovers()
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "101"), django_capture_on_commit_callbacks)
    assert status() == 0
    services.provider_set_down("binance", True)
    with django_capture_on_commit_callbacks(execute=True):
        services.reevaluate()
    assert (failovers() - before, status()) == (1, 1)
    # bybit keeps serving as a failover: a new value is not a new failover.
    accept(make_quote("bybit", "BTC-USD", "101.5"), django_capture_on_commit_callbacks)
    assert (failovers() - before, status()) == (1, 1)
    services.provider_set_down("binance", False)
    accept(make_quote("binance", "BTC-USD", "100.2"), django_capture_on_commit_callbacks)
    assert (failovers() - before, status()) == (1, 0)
    checked = CurrentRate.objects.get(item__code="BTC-USD").checked_at.timestamp()
    labels = {"pair": "BTC-USD"}
    assert REGISTRY.get_sample_value("kurs_rate_checked_timestamp_seconds", labels) == checked


def test_a_new_owner_exports_each_stored_pair_status_before_its_first_write(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """A fetcher that takes over (or restarts) shows every pair's gauges at once, not only the
    pairs it has written since (the dashboard's status panel went blank after a restart)."""
    item("BTC-USD")
    accept(make_quote("bybit", "BTC-USD", "101"), django_capture_on_commit_callbacks)
    CurrentRate.objects.filter(item__code="BTC-USD").update(status="failover")
    checked = CurrentRate.objects.get(item__code="BTC-USD").checked_at.timestamp()
    labels = {"pair": "BTC-USD"}
    failovers = {"pair": "BTC-USD", "provider": "bybit"}
    before = REGISTRY.get_sample_value("kurs_failovers_total", failovers) or 0.0
    metrics.RATE_STATUS.remove("BTC-USD")  # as in a fetcher that has just started
    metrics.RATE_CHECKED.remove("BTC-USD")
    assert REGISTRY.get_sample_value("kurs_rate_status", labels) is None
    assert services.board_load(board=QuoteBoard()) == 1
    assert REGISTRY.get_sample_value("kurs_rate_status", labels) == 1  # failover
    assert REGISTRY.get_sample_value("kurs_rate_checked_timestamp_seconds", labels) == checked
    # Loading is not a takeover of the pair by bybit: no failover is counted.
    assert (REGISTRY.get_sample_value("kurs_failovers_total", failovers) or 0.0) == before


def test_a_stale_serving_quote_hands_the_pair_to_the_next_provider(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    item("BTC-USD")
    start = timezone.now()
    accept(
        make_quote("binance", "BTC-USD", "100", now=start),
        django_capture_on_commit_callbacks,
        now=start,
    )
    later = start + timedelta(seconds=31)  # binance's quote is now older than KURS_STALE_AFTER
    accept(
        make_quote("bybit", "BTC-USD", "101", now=later),
        django_capture_on_commit_callbacks,
        now=later,
    )
    assert [e["provider"] for e in rate_events(published_events)] == ["binance", "bybit"]


def test_an_absurd_price_is_rejected_counted_and_fails_over(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    btc = item("BTC-USD")
    accept(make_quote("binance", "BTC-USD", "90000"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "90010"), django_capture_on_commit_callbacks)
    before = rejected("binance", "jump")
    result = accept(
        make_quote("binance", "BTC-USD", "90000000"), django_capture_on_commit_callbacks
    )
    assert not result.accepted
    assert result.reason == "jump"
    assert rejected("binance", "jump") == before + 1
    assert not Rate.objects.filter(item=btc, value=Decimal("90000000")).exists()
    # binance's good quote no longer speaks for the pair: bybit serves it.
    assert rate_events(published_events)[-1]["provider"] == "bybit"


def test_a_jump_confirmed_by_a_second_provider_is_accepted(
    django_capture_on_commit_callbacks: Any,
) -> None:
    item("BTC-USD")
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    # The market really moved 50%: the first provider to say so has no second opinion yet...
    first = accept(make_quote("bybit", "BTC-USD", "150"), django_capture_on_commit_callbacks)
    assert first.reason == "jump"
    # ...the second one is confirmed by it (within KURS_MAX_JUMP of each other).
    second = accept(make_quote("binance", "BTC-USD", "151"), django_capture_on_commit_callbacks)
    assert second.accepted


def test_a_new_owner_keeps_the_serving_provider_and_the_jump_reference(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    fail_binance_over_to_bybit(django_capture_on_commit_callbacks)
    # A restart: the next owner starts from the stored current rates only.
    services._board = QuoteBoard()
    assert services.board_load() == 1
    # What its fetcher tells it: binance lists BTC-USD, so bybit serving is still a failover.
    services.get_board().set_best_possible({"BTC-USD": (0, 0)})
    with django_capture_on_commit_callbacks(execute=True):
        assert services.reevaluate() == 0  # no flip, nothing to say
    result = accept(make_quote("bybit", "BTC-USD", "1010"), django_capture_on_commit_callbacks)
    assert result.reason == "jump"
    accept(make_quote("bybit", "BTC-USD", "101.5"), django_capture_on_commit_callbacks)
    # The absurd quote withdrew bybit's last one (nothing fresh left: stale), then it served on.
    assert [(e["provider"], e["status"], e["version"]) for e in rate_events(published_events)][
        -2:
    ] == [("bybit", "stale", 3), ("bybit", "failover", 4)]


def test_a_loaded_rate_is_confirmed_at_once_even_just_after_boot() -> None:
    """A new owner has not written its loaded rates: their first confirmation is due at once,
    however close to boot it starts (monotonic time counts from boot, so a "last write" of
    0.0 held it back for up to a heartbeat after boot)."""
    store_current(item("BTC-USD"), "binance", "100", checked_ago=10)
    board = services.get_board()
    assert services.board_load(board=board) == 1
    now = timezone.now()
    quote = make_quote("binance", "BTC-USD", "100", now=now)
    board.accept("BTC-USD", services._validate(quote, cross=None, now=now, board=board))
    state = board.state("BTC-USD", now=now)
    just_after_boot = 1.0
    decision = services.decide("BTC-USD", state, now=now, monotonic=just_after_boot)
    assert decision.current is not None
    assert decision.current.checked_at == now  # the confirmation, same value and provider
    assert (decision.current.provider, decision.current.value) == ("binance", Decimal(100))
    # Had this owner written it (half a second after boot), the heartbeat would hold it back.
    assert state.current is not None
    written = replace(state, current=replace(state.current, written=0.5))
    assert services.decide("BTC-USD", written, now=now, monotonic=just_after_boot).current is None


@pytest.mark.parametrize(
    ("value", "age", "reason"),
    [
        ("NaN", 0, "not_a_number"),
        ("-1", 0, "not_positive"),
        ("100", 31, "stale"),
        ("100", -60, "future"),
    ],
)
def test_invalid_quotes_are_rejected_with_their_reason_and_not_stored(
    django_capture_on_commit_callbacks: Any, value: str, age: float, reason: str
) -> None:
    btc = item("BTC-USD")
    before = rejected("bybit", reason)
    result = accept(
        make_quote("bybit", "BTC-USD", value, age=age), django_capture_on_commit_callbacks
    )
    assert result.reason == reason
    assert rejected("bybit", reason) == before + 1
    assert not Rate.objects.filter(item=btc).exists()


def test_cbr_quotes_stay_fresh_for_a_day(django_capture_on_commit_callbacks: Any) -> None:
    item("USD-RUB")
    result = accept(
        make_quote("cbr", "USD-RUB", "80.1234", age=20 * 3600), django_capture_on_commit_callbacks
    )
    assert result.accepted
    assert result.stored


def test_quotes_of_untracked_or_inactive_pairs_are_not_stored(
    django_capture_on_commit_callbacks: Any,
) -> None:
    item("ETH-USD", is_active=False)
    for pair in ("ETH-USD", "SOL-USD"):
        result = accept(make_quote("binance", pair, "140"), django_capture_on_commit_callbacks)
        assert result.accepted
        assert not result.stored
    assert not Rate.objects.exists()


def test_a_rub_pair_is_derived_from_two_fresh_legs_when_no_provider_quotes_it(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    btc_rub = item("BTC-RUB")
    accept(make_quote("binance", "BTC-USD", "90000.12"), django_capture_on_commit_callbacks)
    leg = accept(
        make_quote("cbr", "USD-RUB", "80.1234", age=3600), django_capture_on_commit_callbacks
    )
    (cross,) = leg.derived
    assert cross.accepted
    assert cross.stored
    rate = Rate.objects.get(item=btc_rub)
    assert rate.value == Decimal("90000.12") * Decimal("80.1234")
    assert rate.provider == "binance+cbr"
    assert rate.derived is True
    (event,) = rate_events(published_events, "BTC-RUB")
    assert event["derived"] is True
    assert event["provider"] == "binance+cbr"


def test_a_direct_quote_outranks_the_cross_rate(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    item("BTC-RUB")
    accept(make_quote("binance", "BTC-USD", "90000"), django_capture_on_commit_callbacks)
    accept(make_quote("cbr", "USD-RUB", "80", age=3600), django_capture_on_commit_callbacks)
    accept(make_quote("coingecko", "BTC-RUB", "7200100"), django_capture_on_commit_callbacks)
    # A later binance move updates the cross rate, which is neither published nor stored now.
    result = accept(make_quote("binance", "BTC-USD", "90001"), django_capture_on_commit_callbacks)
    assert not any(cross.stored or cross.published for cross in result.derived)
    assert [(e["provider"], e["derived"]) for e in rate_events(published_events, "BTC-RUB")] == [
        ("binance+cbr", True),
        ("coingecko", False),
    ]


def test_no_cross_rate_without_a_fresh_second_leg(django_capture_on_commit_callbacks: Any) -> None:
    item("BTC-RUB")
    start = timezone.now()
    accept(
        make_quote("cbr", "USD-RUB", "80", now=start), django_capture_on_commit_callbacks, now=start
    )
    later = start + timedelta(days=5)  # past cbr's freshness window
    result = accept(
        make_quote("binance", "BTC-USD", "90000", now=later),
        django_capture_on_commit_callbacks,
        now=later,
    )
    assert result.accepted
    assert result.derived == []


def test_aliased_assets_cross_through_usd(django_capture_on_commit_callbacks: Any) -> None:
    usdt_rub = item("USDTTRC-RUB")
    accept(make_quote("coingecko", "USDTTRC-USD", "1.0003"), django_capture_on_commit_callbacks)
    accept(make_quote("cbr", "USD-RUB", "80", age=60), django_capture_on_commit_callbacks)
    rate = Rate.objects.get(item=usdt_rub)
    assert (rate.provider, rate.value) == ("coingecko+cbr", Decimal("80.024"))


def test_prune_history_deletes_rows_older_than_the_retention() -> None:
    btc = item("BTC-USD")
    now = timezone.now()
    for days in (0, 89, 91):
        moment = now - timedelta(days=days)
        Rate.objects.create(
            item=btc, provider="binance", value=Decimal(1), source_time=moment, received_at=moment
        )
    assert services.prune_history(days=90) == 1
    assert Rate.objects.count() == 2


def test_without_a_usd_proxy_a_usd_pair_crosses_through_usdt_usd(
    django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    settings.KURS_USD_PROXY = ""
    btc_usd = item("BTC-USD")
    accept(make_quote("binance", "BTC-USDT", "90000"), django_capture_on_commit_callbacks)
    accept(make_quote("coingecko", "USDT-USD", "1.0002"), django_capture_on_commit_callbacks)
    rate = Rate.objects.get(item=btc_usd)
    assert (rate.provider, rate.value, rate.derived) == (
        "binance+coingecko",
        Decimal("90018"),
        True,
    )


def test_each_provider_has_its_freshness_window(settings: Any) -> None:
    settings.KURS_STALE_AFTER = 30.0
    assert policy.provider_freshness("binance") == 30.0
    assert policy.provider_freshness("cbr") >= 86400
    assert policy.provider_freshness("binance+cbr") == 30.0


# Outside a test transaction: the error path drops the connection as it would in production.
@pytest.mark.django_db(transaction=True)
def test_a_database_error_loses_the_row_not_the_rate(
    django_capture_on_commit_callbacks: Any,
    published_events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    item("BTC-USD")

    def locked(*args: Any, **kwargs: Any) -> int:
        raise OperationalError("database is locked")

    with monkeypatch.context() as patched:
        patched.setattr(RATE_ROWS, "write", locked)  # the history row's insert
        result = accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    assert result.accepted
    assert not result.stored
    # Nothing half-written: no current rate without its history row, and no event for it...
    assert not CurrentRate.objects.exists()
    assert rate_events(published_events) == []
    # ...but the board kept the quote, so the next decision (the owner's tick) writes both.
    with django_capture_on_commit_callbacks(execute=True):
        assert services.reevaluate() == 1
    assert [event["value"] for event in rate_events(published_events)] == [Decimal(100)]
    assert CurrentRate.objects.get().value == Decimal(100)
    assert Rate.objects.get().value == Decimal(100)


# Committed for real: the failure must roll back a real transaction, and the connection
# it leaves (closed by `_persist` on PostgreSQL) must serve the next write.
@pytest.mark.django_db(transaction=True)
def test_a_failed_current_write_rolls_back_the_row_and_the_next_write_stores_it(
    django_capture_on_commit_callbacks: Any,
    published_events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection dies between the history row and the current rate (pg_terminate_backend):
    the row goes with the transaction, and the same value quoted again must bring it back."""
    item("BTC-USD")

    def dropped(rows: Any) -> None:
        raise OperationalError("terminating connection due to administrator command")

    with monkeypatch.context() as patched:
        patched.setattr(services, "_write_currents", dropped)
        result = accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    assert not result.stored
    assert not Rate.objects.exists()
    assert not CurrentRate.objects.exists()
    result = accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    assert result.stored
    assert CurrentRate.objects.get().value == Rate.objects.get().value == Decimal(100)


# Committed for real: the failure must roll back a real transaction, and the connection
# it leaves (closed by `_persist` on PostgreSQL) must serve the next write.
@pytest.mark.django_db(transaction=True)
def test_a_value_decided_again_with_another_providers_quote_brings_its_own_row(
    django_capture_on_commit_callbacks: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binance's write fails (connection terminated); the next quote is Bybit's, and the
    decision it triggers makes Binance's value current: Binance's row must come with it."""
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    btc = item("BTC-USD")
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)

    def dropped(rows: Any) -> None:
        raise OperationalError("terminating connection due to administrator command")

    with monkeypatch.context() as patched:
        patched.setattr(services, "_write_currents", dropped)
        accept(make_quote("binance", "BTC-USD", "101"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "100.5"), django_capture_on_commit_callbacks)
    current = CurrentRate.objects.get(item=btc)
    assert (current.provider, current.value) == ("binance", Decimal(101))
    assert Rate.objects.filter(item=btc, provider="binance", value=Decimal(101)).exists()


def test_a_cross_rate_that_starts_serving_on_a_tick_gets_its_history_row(
    django_capture_on_commit_callbacks: Any,
) -> None:
    btc = item("BTC-RUB")
    accept(make_quote("binance", "BTC-USD", "90000"), django_capture_on_commit_callbacks)
    accept(make_quote("cbr", "USD-RUB", "80", age=3600), django_capture_on_commit_callbacks)
    accept(make_quote("coingecko", "BTC-RUB", "7200100"), django_capture_on_commit_callbacks)
    # The cross rate moves while CoinGecko serves: computed, not stored...
    accept(make_quote("binance", "BTC-USD", "90001"), django_capture_on_commit_callbacks)
    # ...until CoinGecko goes down and the owner's tick hands the pair to it.
    services.provider_set_down("coingecko", True)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.reevaluate() == 1
    current = CurrentRate.objects.get(item=btc)
    assert (current.provider, current.value) == ("binance+cbr", Decimal("7200080"))
    assert Rate.objects.filter(item=btc, provider=current.provider, value=current.value).exists()


def test_one_failing_quote_does_not_stop_the_rest_of_a_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    item("BTC-USD")
    item("ETH-USD")
    real = services._accept_quote

    def flaky(quote: Any, **kwargs: Any) -> services.Acceptance:
        if quote.pair == "BTC-USD":
            raise RuntimeError("a bug")
        return real(quote, **kwargs)

    monkeypatch.setattr(services, "_accept_quote", flaky)
    results = services.accept_quotes(
        [make_quote("binance", "BTC-USD", "100"), make_quote("binance", "ETH-USD", "3000")]
    )
    assert [(r.accepted, r.reason) for r in results] == [(False, "error"), (True, None)]
    assert Rate.objects.get().item.code == "ETH-USD"


def test_a_cross_rate_is_rounded_once_and_stored_exactly_as_published(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    item("ETH-RUB")
    accept(
        make_quote("binance", "ETH-USD", "3000.123456789012"), django_capture_on_commit_callbacks
    )
    accept(make_quote("cbr", "USD-RUB", "80.1234567891"), django_capture_on_commit_callbacks)
    exact = Decimal("3000.123456789012") * Decimal("80.1234567891")  # 22 decimal places
    rate = Rate.objects.get(item__code="ETH-RUB")
    assert rate.value == exact.quantize(Decimal("1E-18"))
    assert rate.value != exact
    (event,) = rate_events(published_events, "ETH-RUB")
    assert event["value"] == rate.value


def test_a_sole_sources_jump_is_accepted_once_held_for_the_hold_period(
    django_capture_on_commit_callbacks: Any,
) -> None:
    item("USD-RUB")
    start = timezone.now()

    def cbr(value: str, after: timedelta) -> services.Acceptance:
        moment = start + after
        quote = make_quote("cbr", "USD-RUB", value, now=moment)
        return accept(quote, django_capture_on_commit_callbacks, now=moment)

    assert cbr("80", timedelta(0)).accepted
    # A 30% move with nobody to confirm or contradict it: held, not believed at once...
    assert cbr("104", timedelta(minutes=1)).reason == "jump"
    assert cbr("104.5", timedelta(minutes=4)).reason == "jump"
    # ...and believed once the only source has kept saying so for JUMP_HOLD.
    assert cbr("104.2", timedelta(minutes=6)).accepted
    assert cbr("104.3", timedelta(minutes=7)).accepted


def test_a_jump_another_provider_contradicts_is_never_accepted(
    django_capture_on_commit_callbacks: Any,
) -> None:
    item("BTC-USD")
    start = timezone.now()
    for minute in range(0, 11):
        moment = start + timedelta(minutes=minute)
        bybit = make_quote("bybit", "BTC-USD", "90010", now=moment)
        accept(bybit, django_capture_on_commit_callbacks, now=moment)
        binance = make_quote("binance", "BTC-USD", "90" if minute else "90000", now=moment)
        result = accept(binance, django_capture_on_commit_callbacks, now=moment)
        assert result.accepted == (minute == 0)


@pytest.mark.django_db(transaction=True)
def test_a_quote_for_an_item_deleted_meanwhile_is_a_one_line_warning(
    caplog: pytest.LogCaptureFixture, published_events: Events
) -> None:
    btc = item("BTC-USD")
    services.active_items()  # the owner knows the item...
    btc.delete()  # ...which is deleted before its next quote arrives
    result = services.accept_quote(make_quote("binance", "BTC-USD", "100"))
    assert result.accepted
    assert not result.stored
    warnings = [
        r for r in caplog.records if r.name == "rates.services" and r.levelname == "WARNING"
    ]
    assert [r.getMessage() for r in warnings] == [
        "BTC-USD was deleted while being quoted; its rate is dropped"
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert rate_events(published_events) == []
    assert not CurrentRate.objects.exists()


def test_the_cross_routes_by_leg_follow_the_items_and_the_proxy(settings: Any) -> None:
    """`_dependants` reads an index the board keeps until its items (or the proxy) change."""
    settings.KURS_USD_PROXY = "USDT"
    board = QuoteBoard()
    board.set_items([("BTC-RUB", 1, None)])
    routes = services._dependants("USD-RUB", board)
    assert [(code, first.code, second.code) for code, first, second in routes] == [
        ("BTC-RUB", "BTC-USD", "USD-RUB")
    ]
    assert services._dependants("ETH-USD", board) == []
    board.set_items([("BTC-RUB", 1, None), ("ETH-RUB", 2, None)])
    assert [code for code, _, _ in services._dependants("USD-RUB", board)] == [
        "BTC-RUB",
        "ETH-RUB",
    ]
    assert services._dependants("USDC-RUB", board) == []
    settings.KURS_USD_PROXY = "USDC"  # a third route through the new proxy, for both items
    assert [code for code, _, _ in services._dependants("USDC-RUB", board)] == [
        "BTC-RUB",
        "ETH-RUB",
    ]
