from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import LazySettings

from rates.board import Current, Entry, QuoteBoard

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


def served_by(board: QuoteBoard, pair: str, now: datetime = NOW) -> str | None:
    best = board.best(pair, now=now)
    return None if best is None else best.provider


def test_the_highest_priority_fresh_entry_serves() -> None:
    board = QuoteBoard()
    board.accept("BTC-USD", entry("bybit", "101", (0, 1)))
    board.accept("BTC-USD", entry("binance", "100", (0, 0)))
    assert served_by(board, "BTC-USD") == "binance"


def test_a_stale_entry_does_not_serve() -> None:
    board = QuoteBoard()
    board.accept("BTC-USD", entry("binance", "100", (0, 0), fresh_for=10))
    board.accept("BTC-USD", entry("bybit", "101", (0, 1), fresh_for=60))
    assert served_by(board, "BTC-USD", NOW + timedelta(seconds=11)) == "bybit"
    assert board.best("BTC-USD", now=NOW + timedelta(seconds=61)) is None


def test_a_down_provider_does_not_serve_nor_do_cross_rates_built_on_it() -> None:
    board = QuoteBoard()
    board.accept("BTC-RUB", entry("binance+cbr", "7200000", (1, 0, 3)))
    board.accept("BTC-RUB", entry("coingecko", "7200100", (0, 2)))
    assert board.set_down("coingecko", True)
    assert served_by(board, "BTC-RUB") == "binance+cbr"
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


def test_a_loaded_board_serves_the_stored_rate_and_keeps_it_as_the_jump_reference(
    settings: LazySettings,
) -> None:
    settings.KURS_PROVIDERS = ["binance", "bybit"]
    settings.KURS_STALE_AFTER = 30.0
    board = QuoteBoard()
    stored = Current(
        provider="bybit",
        value=Decimal("101"),
        bid=None,
        ask=None,
        source_time=NOW - timedelta(seconds=20),
        checked_at=NOW - timedelta(seconds=10),
        received_at=NOW - timedelta(seconds=20),
        derived=False,
        route=(),
        status="failover",
        version=7,
    )
    board.load([("BTC-USD", stored)])
    served = board.best("BTC-USD", now=NOW)
    assert served is not None
    assert (served.provider, served.value) == ("bybit", Decimal("101"))
    assert served.checked_at == stored.checked_at  # fresh until checked_at + 30 s
    assert board.best("BTC-USD", now=NOW + timedelta(seconds=21)) is None
    assert board.reference("BTC-USD") == Decimal("101")
    assert board.get_current("BTC-USD") == stored


def test_the_expected_priority_counts_providers_able_to_quote_the_pair() -> None:
    board = QuoteBoard()
    board.accept("BTC-USD", entry("bybit", "101", (0, 1)))
    assert board.expected_priority("BTC-USD") == (0, 1)
    board.set_best_possible({"BTC-USD": (0, 0)})
    assert board.expected_priority("BTC-USD") == (0, 0)
    assert board.expected_priority("ETH-RUB") is None


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
