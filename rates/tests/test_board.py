from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from rates.board import Entry, QuoteBoard

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def entry(provider: str, value: str, priority: tuple[int, ...], *, fresh_for: float = 30) -> Entry:
    return Entry(
        provider=provider,
        value=Decimal(value),
        source_time=NOW,
        fresh_until=NOW + timedelta(seconds=fresh_for),
        priority=priority,
        derived="+" in provider,
    )


def test_the_highest_priority_fresh_entry_serves() -> None:
    board = QuoteBoard()
    board.accept("BTC-USD", entry("bybit", "101", (0, 1)))
    board.accept("BTC-USD", entry("binance", "100", (0, 0)))
    assert board.best("BTC-USD", now=NOW).provider == "binance"


def test_a_stale_entry_does_not_serve() -> None:
    board = QuoteBoard()
    board.accept("BTC-USD", entry("binance", "100", (0, 0), fresh_for=10))
    board.accept("BTC-USD", entry("bybit", "101", (0, 1), fresh_for=60))
    assert board.best("BTC-USD", now=NOW + timedelta(seconds=11)).provider == "bybit"
    assert board.best("BTC-USD", now=NOW + timedelta(seconds=61)) is None


def test_a_down_provider_does_not_serve_nor_do_cross_rates_built_on_it() -> None:
    board = QuoteBoard()
    board.accept("BTC-RUB", entry("binance+cbr", "7200000", (1, 0, 3)))
    board.accept("BTC-RUB", entry("coingecko", "7200100", (0, 2)))
    assert board.set_down("coingecko", True)
    assert board.best("BTC-RUB", now=NOW).provider == "binance+cbr"
    board.set_down("binance", True)
    assert board.best("BTC-RUB", now=NOW) is None
    assert not board.set_down("binance", True)  # no change


def test_direct_only_skips_cross_rates() -> None:
    board = QuoteBoard()
    board.accept("BTC-USD", entry("binance+coingecko", "90000", (1, 0, 2)))
    assert board.best("BTC-USD", now=NOW, direct_only=True) is None


def test_confirmations_come_from_other_fresh_sources_only() -> None:
    board = QuoteBoard()
    binance = entry("binance", "150", (0, 0))
    board.offer("BTC-USD", binance)
    board.offer("BTC-USD", entry("bybit", "149", (0, 1)))
    board.offer("BTC-USD", entry("binance+coingecko", "148", (1, 0, 2)))
    board.offer("BTC-USD", entry("coingecko", "10", (0, 2), fresh_for=-1))
    assert board.confirmations("BTC-USD", binance, now=NOW) == [Decimal(149)]


def test_publishing_again_needs_a_change_or_the_heartbeat() -> None:
    board = QuoteBoard()
    first = entry("binance", "100", (0, 0))
    assert board.should_publish("BTC-USD", first, heartbeat=60)
    board.mark_published("BTC-USD", first)
    assert not board.should_publish("BTC-USD", first, heartbeat=60)
    assert board.should_publish("BTC-USD", entry("binance", "100.01", (0, 0)), heartbeat=60)
    assert board.should_publish("BTC-USD", entry("bybit", "100", (0, 1)), heartbeat=60)
    assert board.should_publish("BTC-USD", first, heartbeat=0)
    assert board.served_by("binance") == ["BTC-USD"]
    assert board.served_by("bybit") == []


def test_a_level_is_held_only_while_it_stays_within_the_limit() -> None:
    board = QuoteBoard()
    hold = timedelta(minutes=5)

    def held(value: str, minutes: float) -> bool:
        level = entry("cbr", value, (0, 3))
        now = NOW + timedelta(minutes=minutes)
        return board.held("USD-RUB", level, now=now, hold=hold, max_jump=0.2)

    assert not held("104", 0)
    assert not held("150", 4)  # moved away: the clock starts again
    assert not held("151", 8)
    assert held("150.5", 9)
