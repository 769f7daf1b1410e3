from __future__ import annotations

from typing import TypedDict, Unpack

from rates.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Options(TypedDict, total=False):
    threshold: int
    backoff: float
    max_backoff: float


def make(**options: Unpack[Options]) -> tuple[CircuitBreaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "binance",
        clock=clock,
        on_change=lambda name, state, reason: changes.append((state, reason)),
        **options,
    )
    return breaker, clock, changes


def test_it_stays_closed_below_the_threshold() -> None:
    breaker, _, changes = make(threshold=3)
    breaker.record_failure("HTTP 500")
    breaker.record_failure("HTTP 500")
    assert breaker.state == CLOSED
    assert breaker.allow()
    assert changes == []


def test_a_success_resets_the_failure_count() -> None:
    breaker, _, _ = make(threshold=2)
    breaker.record_failure("HTTP 500")
    breaker.record_success()
    breaker.record_failure("HTTP 500")
    assert breaker.state == CLOSED


def test_it_opens_after_threshold_failures_and_refuses_calls() -> None:
    breaker, _, changes = make(threshold=3, backoff=10)
    for _ in range(3):
        breaker.record_failure("HTTP 503")
    assert breaker.state == OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == 10
    assert changes[0][0] == OPEN
    assert "HTTP 503" in changes[0][1]


def test_it_half_opens_after_the_backoff_and_closes_on_success() -> None:
    breaker, clock, changes = make(threshold=1, backoff=10)
    breaker.record_failure("timeout")
    clock.now += 9.9
    assert breaker.state == OPEN
    clock.now += 0.2
    assert breaker.state == HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED
    assert [state for state, _ in changes] == [OPEN, HALF_OPEN, CLOSED]


def test_a_failed_probe_reopens_with_a_doubled_backoff() -> None:
    breaker, clock, _ = make(threshold=1, backoff=10, max_backoff=15)
    breaker.record_failure("timeout")
    clock.now += 11
    assert breaker.allow()  # the probe goes out
    breaker.record_failure("timeout again")
    assert breaker.state == OPEN
    assert breaker.retry_in() == 15  # doubled to 20, capped at max_backoff


def test_a_rate_limit_opens_at_once_for_at_least_retry_after() -> None:
    breaker, clock, changes = make(threshold=5, backoff=10)
    breaker.record_failure("HTTP 429", retry_after=42)
    assert breaker.state == OPEN
    clock.now += 41
    assert not breaker.allow()
    clock.now += 1.5
    assert breaker.allow()
    assert "retry in 42s" in changes[0][1]


def test_a_short_retry_after_still_waits_the_backoff() -> None:
    breaker, clock, _ = make(backoff=10)
    breaker.record_failure("HTTP 429", retry_after=1)
    clock.now += 2
    assert breaker.state == OPEN


def test_reading_the_state_moves_nothing_and_publishes_nothing() -> None:
    breaker, clock, changes = make(threshold=1, backoff=10)
    breaker.record_failure("timeout")
    clock.now += 11
    assert breaker.state == HALF_OPEN  # what a status page shows
    assert [state for state, _ in changes] == [OPEN]  # ... without a transition
    assert breaker.allow()
    assert [state for state, _ in changes] == [OPEN, HALF_OPEN]
