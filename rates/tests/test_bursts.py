"""A burst of quotes, one transaction (`rates.services.accept_quotes`, `Writes`): every quote
decided in turn as alone, every row written with one commit, and a failing write losing nothing
but itself, with no half-written row (docs/scaling.md#the-owner)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from items.models import Item
from rates import services
from rates.models import CurrentRate, Rate, ServedRate
from rates.tests.support import make_quote, rate_events
from realtime.models import OutboxEvent

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("rate_settings", "fresh_board")]

Events = list[tuple[str, dict[str, Any]]]
COINS = ("BTC", "ETH", "SOL", "XRP", "ADA", "DOT", "TRX", "LTC")


def items(*codes: str) -> dict[str, Item]:
    """The items (some are seeded by a migration), active."""
    found = {}
    for code in codes:
        base, quote = code.split("-")
        found[code] = Item.objects.update_or_create(
            base=base, quote=quote, defaults={"is_active": True}
        )[0]
    return found


def burst(pairs: list[str], value: str, capture: Any) -> list[services.Acceptance]:
    with capture(execute=True):
        return services.accept_quotes([make_quote("binance", pair, value) for pair in pairs])


def written(pair: str) -> tuple[int, int, int, int]:
    """History rows, current version, served versions and outbox rows of one pair."""
    current = CurrentRate.objects.filter(item__code=pair).first()
    return (
        Rate.objects.filter(item__code=pair).count(),
        current.version if current else 0,
        ServedRate.objects.filter(item__code=pair).count(),
        OutboxEvent.objects.filter(subject__endswith=f".rates.{pair}").count(),
    )


def test_a_burst_is_written_with_a_few_statements_whatever_its_size(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    small = [f"{coin}-USD" for coin in COINS[:2]]
    large = [f"{coin}-USD" for coin in COINS]
    items(*large)
    burst(large, "100", django_capture_on_commit_callbacks)  # each pair's first rate
    statements = []
    for pairs, value in ((small, "101"), (large, "102")):
        with CaptureQueriesContext(connection) as queries:
            results = burst(pairs, value, django_capture_on_commit_callbacks)
        assert all(result.stored and result.published for result in results)
        statements.append(len(queries))
    # The history rows, the current rates, the served versions, the outbox rows: one statement
    # each, for two pairs as for eight.
    assert statements[0] == statements[1]
    assert [written(pair) for pair in small] == [(3, 3, 3, 3)] * 2
    assert [written(pair) for pair in large[2:]] == [(2, 2, 2, 2)] * 6
    assert [event["version"] for event in rate_events(published_events, "BTC-USD")] == [1, 2, 3]


def test_two_quotes_of_a_pair_in_one_burst_are_two_versions_in_order(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    items("BTC-USD")
    with django_capture_on_commit_callbacks(execute=True):
        services.accept_quotes(
            [make_quote("binance", "BTC-USD", "100"), make_quote("binance", "BTC-USD", "101")]
        )
    assert [(e["version"], e["value"]) for e in rate_events(published_events)] == [
        (1, Decimal(100)),
        (2, Decimal(101)),
    ]
    served = ServedRate.objects.order_by("version").values_list("version", "value", "event_id")
    events = [envelope["id"] for _, envelope in published_events]
    assert [(v, value) for v, value, _ in served] == [(1, Decimal(100)), (2, Decimal(101))]
    assert [str(event_id) for _, _, event_id in served] == events
    assert CurrentRate.objects.get().version == 2
    assert sorted(Rate.objects.values_list("value", flat=True)) == [Decimal(100), Decimal(101)]


# Committed for real: the burst's transaction must roll back, and each write then go alone.
@pytest.mark.django_db(transaction=True)
def test_a_write_failing_mid_burst_fails_alone_and_leaves_no_half_written_row(
    django_capture_on_commit_callbacks: Any,
    published_events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pairs = [f"{coin}-USD" for coin in COINS[:4]]
    rows = items(*pairs)
    broken = rows["ETH-USD"].pk
    real = services._write_currents

    def failing(currents: dict[int, Any]) -> None:
        if broken in currents:  # the burst's write, then ETH-USD's own
            raise OperationalError("terminating connection due to administrator command")
        real(currents)

    with monkeypatch.context() as patched:
        patched.setattr(services, "_write_currents", failing)
        results = burst(pairs, "100", django_capture_on_commit_callbacks)
    assert [result.stored for result in results] == [True, False, True, True]
    # The others are written whole; ETH-USD not at all: no history row without its current
    # rate, no current rate without its served version and its event.
    assert {pair: written(pair) for pair in pairs} == {
        "BTC-USD": (1, 1, 1, 1),
        "ETH-USD": (0, 0, 0, 0),
        "SOL-USD": (1, 1, 1, 1),
        "XRP-USD": (1, 1, 1, 1),
    }
    assert [event["direction"] for event in rate_events(published_events)] == [
        "BTC-USD",
        "SOL-USD",
        "XRP-USD",
    ]
    # The board kept ETH-USD's quote and learnt only what was committed: the owner's next
    # tick writes it, as version 1, with its history row.
    with django_capture_on_commit_callbacks(execute=True):
        assert services.reevaluate() == 1
    assert written("ETH-USD") == (1, 1, 1, 1)
    assert [event["version"] for event in rate_events(published_events)] == [1, 1, 1, 1]


@pytest.mark.django_db(transaction=True)
def test_a_pair_whose_write_fails_keeps_no_later_version_of_the_burst(
    django_capture_on_commit_callbacks: Any,
    published_events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version 2 builds on version 1: when 1 cannot be written, 2 is not either (a reader must
    never see a version skipped), and the next decision writes the pair's latest value as 1."""
    items("BTC-USD", "ETH-USD")
    real = services._write_currents
    calls = []

    def failing(currents: dict[int, Any]) -> None:
        calls.append(len(currents))
        if len(calls) <= 2:  # the burst's write, then BTC-USD's version 1
            raise OperationalError("terminating connection due to administrator command")
        real(currents)

    quotes = [
        make_quote("binance", "BTC-USD", "100"),
        make_quote("binance", "ETH-USD", "3000"),
        make_quote("binance", "BTC-USD", "101"),
    ]
    with monkeypatch.context() as patched, django_capture_on_commit_callbacks(execute=True):
        patched.setattr(services, "_write_currents", failing)
        results = services.accept_quotes(quotes)
    assert [result.stored for result in results] == [False, True, False]
    assert written("BTC-USD") == (0, 0, 0, 0)
    assert written("ETH-USD") == (1, 1, 1, 1)
    with django_capture_on_commit_callbacks(execute=True):
        services.reevaluate()
    assert CurrentRate.objects.get(item__code="BTC-USD").value == Decimal(101)
    assert [(e["version"], e["value"]) for e in rate_events(published_events, "BTC-USD")] == [
        (1, Decimal(101))
    ]


@pytest.mark.django_db(transaction=True)
def test_an_item_deleted_mid_burst_drops_its_rate_alone(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    rows = items("BTC-USD", "ETH-USD")
    services.active_items()  # the owner knows both items...
    rows["BTC-USD"].delete()  # ...one is deleted before the burst is written
    results = burst(["BTC-USD", "ETH-USD"], "100", django_capture_on_commit_callbacks)
    assert [result.stored for result in results] == [False, True]
    assert written("ETH-USD") == (1, 1, 1, 1)
    assert not Rate.objects.exclude(item__code="ETH-USD").exists()
    assert [event["direction"] for event in rate_events(published_events)] == ["ETH-USD"]


def test_a_sweep_decides_a_quiet_pair_again_once_its_quote_goes_stale(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    """The owner's tick skips a pair whose decision time alone cannot change yet, and not a
    moment longer: the quote's freshness window ending makes it `stale` at that sweep."""
    items("BTC-USD")
    quote = make_quote("binance", "BTC-USD", "100")
    burst(["BTC-USD"], "100", django_capture_on_commit_callbacks)
    board = services.get_board()
    fresh_until = board.state("BTC-USD", now=quote.source_time).usable[0].fresh_until
    with django_capture_on_commit_callbacks(execute=True):
        assert services.reevaluate(now=quote.source_time) == 0  # found quiet...
        assert services.reevaluate(now=quote.source_time) == 0  # ...and skipped
        assert services.reevaluate(now=fresh_until + timedelta(seconds=1)) == 1
    assert [e["status"] for e in rate_events(published_events)] == ["live", "stale"]


def test_a_new_owner_reads_the_last_history_rows_in_one_query(
    django_capture_on_commit_callbacks: Any, published_events: Events
) -> None:
    pairs = [f"{coin}-USD" for coin in COINS]
    items(*pairs)
    burst(pairs, "100", django_capture_on_commit_callbacks)
    services.get_board().last_stored.clear()  # what a new owner's board remembers
    with CaptureQueriesContext(connection) as queries:
        burst(pairs, "101", django_capture_on_commit_callbacks)
    history_reads = [
        query["sql"]
        for query in queries
        if query["sql"].startswith("SELECT") and Rate._meta.db_table in query["sql"]
    ]
    assert len(history_reads) == 1  # not one per pair and provider
    assert [written(pair)[0] for pair in pairs] == [2] * len(pairs)
    # Remembered again: an unchanged value within STORE_EVERY stores no row.
    services.get_board().last_stored.clear()
    burst(pairs, "101", django_capture_on_commit_callbacks)
    assert [written(pair)[0] for pair in pairs] == [2] * len(pairs)
