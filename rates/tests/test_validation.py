from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from rates.validation import (
    CLOCK_SKEW,
    QuoteRejected,
    check_jump,
    check_time,
    checked_value,
)

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("NaN", "not_a_number"),
        ("Infinity", "not_a_number"),
        ("-Infinity", "not_a_number"),
        ("0", "not_positive"),
        ("-1.5", "not_positive"),
        ("1E+20", "out_of_range"),
        ("1E-19", "out_of_range"),
    ],
)
def test_it_rejects_values_that_are_not_storable_prices(raw: str, reason: str) -> None:
    with pytest.raises(QuoteRejected) as caught:
        checked_value(Decimal(raw))
    assert caught.value.reason == reason


def test_it_keeps_a_price_exactly_at_18_decimal_places() -> None:
    assert checked_value(Decimal("54000.000123")) == Decimal("54000.000123")
    assert checked_value(Decimal("0.1234567890123456789")) == Decimal("0.123456789012345679")


def test_a_source_time_within_the_clock_skew_is_accepted() -> None:
    check_time(NOW + CLOCK_SKEW, now=NOW, freshness=30)


def test_a_source_time_beyond_the_clock_skew_is_in_the_future() -> None:
    with pytest.raises(QuoteRejected) as caught:
        check_time(NOW + CLOCK_SKEW + timedelta(seconds=1), now=NOW, freshness=30)
    assert caught.value.reason == "future"


def test_a_quote_older_than_the_freshness_window_is_stale() -> None:
    check_time(NOW - timedelta(seconds=30), now=NOW, freshness=30)
    with pytest.raises(QuoteRejected) as caught:
        check_time(NOW - timedelta(seconds=31), now=NOW, freshness=30)
    assert caught.value.reason == "stale"


def test_a_day_old_quote_is_fresh_for_a_daily_provider() -> None:
    check_time(NOW - timedelta(hours=20), now=NOW, freshness=86400)


def test_a_move_within_the_limit_passes_without_confirmation() -> None:
    check_jump(Decimal("119"), reference=Decimal("100"), confirmations=[], max_jump=0.2)


def test_a_jump_without_a_second_provider_is_rejected() -> None:
    with pytest.raises(QuoteRejected) as caught:
        check_jump(
            Decimal("100000"), reference=Decimal("100"), confirmations=[Decimal(101)], max_jump=0.2
        )
    assert caught.value.reason == "jump"


def test_a_jump_confirmed_by_a_second_provider_passes() -> None:
    check_jump(
        Decimal("150"), reference=Decimal("100"), confirmations=[Decimal("149")], max_jump=0.2
    )


def test_the_first_quote_of_a_pair_has_nothing_to_jump_from() -> None:
    check_jump(Decimal("150"), reference=None, confirmations=[], max_jump=0.2)
