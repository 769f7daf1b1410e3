"""`/courses` bodies: the seed format, the filters, ETags, and when a cached body is rebuilt."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import LazySettings

from rates.courses import (
    MAX_DIRECTIONS,
    CoursesCache,
    InvalidCoursesQuery,
    etag_matches,
    parse_query,
)
from rates.schemas import DIRECTION_PATTERN, exchanger_pattern
from rates.snapshot import RatesSnapshot

PROVIDERS = ("binance", "bybit", "coingecko", "cbr")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """A snapshot whose notion of "now" is the test's clock; freshness 30 s for everyone."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.version = 0
        self.active: set[str] = set()
        self.rows: dict[str, tuple[str, str, float]] = {}  # code -> (value, provider, at)

    def put(self, code: str, value: str, provider: str, age_s: float = 0.0) -> None:
        self.active.add(code)
        self.rows[code] = (value, provider, self.clock.now - age_s)
        self.version += 1

    def active_pairs(self) -> frozenset[str]:
        return frozenset(self.active)

    def courses(self, pairs: Iterable[str] | None = None) -> list[dict[str, Any]]:
        wanted = self.active if pairs is None else self.active.intersection(pairs)
        out = []
        for code in sorted(wanted):
            if code in self.rows:
                value, provider, at = self.rows[code]
                age = self.clock.now - at
                out.append(
                    {
                        "direction": code,
                        "value": Decimal(value),
                        "provider": provider,
                        "stale": age > 30,
                        "age_s": round(age, 3),
                    }
                )
        return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(clock: Clock, settings: LazySettings) -> FakeSource:
    settings.KURS_STALE_AFTER = 30
    return FakeSource(clock)


def make_cache(source: FakeSource, clock: Clock, max_reuse_s: float = 3600) -> CoursesCache:
    return CoursesCache(source, providers=lambda: PROVIDERS, clock=clock, max_reuse_s=max_reuse_s)


def body(cache: CoursesCache, *directions: str, exchanger: str | None = None) -> dict[str, Any]:
    answer = cache.answer(list(directions), exchanger, None)
    assert answer.status == 200, answer.body
    return json.loads(answer.body)


def test_it_answers_the_seed_format_with_full_precision(source: FakeSource, clock: Clock) -> None:
    source.put("BTC-USD", "54000.000000000000000123", "binance")
    answer = make_cache(source, clock).answer([], None, None)
    assert answer.body == (
        b'{"exchanger":"binance","courses":[{"direction":"BTC-USD",'
        b'"value":54000.000000000000000123}]}'
    )
    assert "Cache-Control" not in dict(answer.headers)  # the edge's (edge.caching)
    assert dict(answer.headers)["Content-Type"] == "application/json; charset=utf-8"


def test_courses_from_several_providers_are_mixed_and_each_names_its_own(
    source: FakeSource, clock: Clock
) -> None:
    source.put("BTC-USD", "54000", "binance")
    source.put("BTC-RUB", "5000000", "coingecko")
    assert body(make_cache(source, clock)) == {
        "exchanger": "mixed",
        "courses": [
            {"direction": "BTC-RUB", "value": 5000000, "exchanger": "coingecko"},
            {"direction": "BTC-USD", "value": 54000, "exchanger": "binance"},
        ],
    }


def test_a_stale_course_keeps_its_value_and_says_so_and_a_pair_never_quoted_is_left_out(
    source: FakeSource, clock: Clock
) -> None:
    source.put("BTC-USD", "54000", "binance", age_s=45)
    source.active.add("ETH-USD")
    assert body(make_cache(source, clock), "ETH-USD", "BTC-USD") == {
        "exchanger": "binance",
        "courses": [{"direction": "BTC-USD", "value": 54000, "stale": True}],
    }


def test_directions_keep_the_order_asked_normalised_and_without_duplicates(
    source: FakeSource, clock: Clock
) -> None:
    for code in ("BTC-USD", "ETH-RUB", "ETH-USD"):
        source.put(code, "1", "binance")
    got = body(make_cache(source, clock), " eth-usd ", "BTC-USD,eth-rub", "ETH-USD", "")
    assert [course["direction"] for course in got["courses"]] == ["ETH-USD", "BTC-USD", "ETH-RUB"]


def test_the_exchanger_filter_keeps_only_the_courses_that_provider_serves_now(
    source: FakeSource, clock: Clock
) -> None:
    source.put("BTC-USD", "54000", "binance")
    source.put("BTC-RUB", "5000000", "coingecko")
    source.put("ETH-USD", "3000", "binance", age_s=40)
    source.put("USD-RUB", "80", "binance+cbr")
    cache = make_cache(source, clock)
    assert body(cache, exchanger="Binance") == {
        "exchanger": "binance",
        "courses": [
            {"direction": "BTC-USD", "value": 54000},
            {"direction": "ETH-USD", "value": 3000, "stale": True},
        ],
    }
    assert body(cache, "BTC-RUB", exchanger="bybit") == {"exchanger": "bybit", "courses": []}
    # A cross rate is named by its legs; `+` unencoded in a query string arrives as a space.
    assert body(cache, exchanger="binance cbr")["courses"] == [
        {"direction": "USD-RUB", "value": 80}
    ]


def test_no_course_at_all_names_no_exchanger(source: FakeSource, clock: Clock) -> None:
    assert body(make_cache(source, clock)) == {"exchanger": None, "courses": []}


@pytest.mark.parametrize(
    ("directions", "exchanger", "field", "fragment"),
    [
        (["BTC_USD"], None, "direction", "'BTC_USD' is not a pair"),
        (["BTC-"], None, "direction", "is not a pair"),
        (["B-USD"], None, "direction", "is not a pair"),
        (["X" * 500], None, "direction", "…"),
        (
            [",".join(f"A{i:03d}-USD" for i in range(MAX_DIRECTIONS + 1))],
            None,
            "direction",
            "at most",
        ),
        ([], "kraken", "exchanger", "unknown provider 'kraken'"),
        ([], "binance+kraken", "exchanger", "unknown provider"),
        # upper() and lower() fold some non-ASCII letters into ASCII ("ß" is "SS", "ı" is "I"):
        # a pair or provider is ASCII, as the OpenAPI's patterns say.
        (["ßß-USD"], None, "direction", "ASCII"),
        (["btc-usd\u00a0"], None, "direction", "ASCII"),
        ([], "bınance", "exchanger", "unknown provider"),
    ],
)
def test_a_malformed_filter_is_a_422_naming_the_field(
    directions: list[str], exchanger: str | None, field: str, fragment: str
) -> None:
    with pytest.raises(InvalidCoursesQuery) as caught:
        parse_query(directions, exchanger, providers=PROVIDERS)
    assert caught.value.field == field
    assert fragment in str(caught.value)
    assert len(str(caught.value)) < 200


def test_an_unknown_or_inactive_pair_is_a_422_with_the_api_error_shape(
    source: FakeSource, clock: Clock
) -> None:
    source.put("BTC-USD", "54000", "binance")
    answer = make_cache(source, clock).answer(["BTC-USD", "ETH-EUR"], None, None)
    assert answer.status == 422
    assert json.loads(answer.body) == {
        "detail": "direction: unknown pair 'ETH-EUR': not an active item",
        "errors": [{"field": "direction", "message": "unknown pair 'ETH-EUR': not an active item"}],
    }
    assert "ETag" not in dict(answer.headers)


def test_if_none_match_with_the_current_etag_is_a_304_without_body(
    source: FakeSource, clock: Clock
) -> None:
    source.put("BTC-USD", "54000", "binance")
    cache = make_cache(source, clock)
    etag = dict(cache.answer([], None, None).headers)["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{24}"', etag)  # strong: no W/ prefix
    for header in (etag, f'"nope", W/{etag}', "*"):
        answer = cache.answer([], None, header)
        assert (answer.status, answer.body) == (304, b"")
        assert dict(answer.headers) == {"ETag": etag}
    assert cache.answer([], None, '"nope"').status == 200
    source.put("BTC-USD", "54001", "binance")
    assert (
        cache.answer([], None, etag).status == 200
    )  # the ETag of a changed body no longer matches


def test_etag_matching_follows_the_weak_comparison_of_if_none_match() -> None:
    assert etag_matches('"a", "b"', '"b"')
    assert etag_matches('W/"b"', '"b"')
    assert not etag_matches('"ab"', '"b"')
    assert not etag_matches("", '"b"')


def test_a_body_is_reused_until_the_snapshot_changes(source: FakeSource, clock: Clock) -> None:
    source.put("BTC-USD", "54000", "binance")
    cache = make_cache(source, clock)
    first = cache.answer([], None, None)
    assert first.built is not None
    clock.now += 10
    assert cache.answer([], None, None) == first
    assert cache.builds == 1
    assert cache.is_current(first.built)
    source.put("BTC-USD", "54001", "binance")
    assert not cache.is_current(first.built)
    assert b"54001" in cache.answer([], None, None).body
    assert cache.builds == 2


def test_a_body_is_rebuilt_when_a_course_turns_stale_without_any_event(
    source: FakeSource, clock: Clock
) -> None:
    source.put("BTC-USD", "54000", "binance", age_s=25)  # stale in 5 s, freshness 30 s
    source.put("ETH-USD", "3000", "binance", age_s=5)  # stale in 25 s
    cache = make_cache(source, clock)
    assert "stale" not in json.dumps(body(cache))
    clock.now += 4.9
    assert "stale" not in json.dumps(body(cache))
    assert cache.builds == 1
    clock.now += 0.2
    courses = body(cache)["courses"]
    assert [course.get("stale", False) for course in courses] == [True, False]
    assert cache.builds == 2
    clock.now += 19  # ETH-USD flips at +25 s
    assert body(cache)["courses"][1].get("stale", False) is False
    clock.now += 1
    assert body(cache)["courses"][1]["stale"] is True


def test_reuse_is_bounded_even_when_no_course_would_flip(source: FakeSource, clock: Clock) -> None:
    source.put("BTC-USD", "54000", "binance", age_s=40)  # already stale: nothing will flip
    cache = make_cache(source, clock, max_reuse_s=1.0)
    first = cache.answer([], None, None)
    assert first.built is not None
    clock.now += 0.9
    cache.answer([], None, None)
    assert cache.builds == 1
    clock.now += 0.2
    # Rebuilt, and the same bytes keep the same ETag: clients' 304s survive the rebuild.
    again = cache.answer([], None, None)
    assert (again.body, again.headers) == (first.body, first.headers)
    assert not cache.is_current(first.built)
    assert cache.builds == 2


def test_the_number_of_cached_combinations_is_bounded(source: FakeSource, clock: Clock) -> None:
    codes = [f"A{i:03d}-USD" for i in range(40)]
    for code in codes:
        source.put(code, "1", "binance")
    cache = CoursesCache(source, providers=lambda: PROVIDERS, clock=clock, max_entries=8)
    for code in codes:
        cache.answer([code], None, None)
    assert len(cache._built) <= 8


def test_a_real_snapshot_course_turns_stale_in_the_cached_body_on_time(
    settings: LazySettings,
) -> None:
    settings.KURS_STALE_AFTER = 0.4
    snapshot = RatesSnapshot()
    snapshot.apply_item("item.created", {"code": "BTC-USD", "is_active": True})
    quoted_at = datetime.now(UTC)
    snapshot.apply_rate(
        {"direction": "BTC-USD", "value": "54000", "provider": "binance", "source_time": quoted_at}
    )
    # Reuse unbounded by time: only the flip deadline can make the body change.
    cache = CoursesCache(snapshot, providers=lambda: PROVIDERS, max_reuse_s=3600)
    assert b"stale" not in cache.answer([], None, None).body
    version = snapshot.version
    # Waited for generously (a loaded machine may not run this thread for seconds), yet far
    # inside the hour the body would be reused for without the flip deadline.
    deadline = quoted_at + timedelta(seconds=60)
    while b"stale" not in cache.answer([], None, None).body:
        assert datetime.now(UTC) < deadline, "the body never showed the course as stale"
        time.sleep(0.005)
    # Never early (how late is the machine's load: the bound is the deadline above).
    assert datetime.now(UTC) - quoted_at > timedelta(seconds=0.4)
    assert snapshot.version == version  # no event: time alone made it stale


def test_the_openapi_patterns_say_what_the_filters_accept() -> None:
    direction, exchanger = (
        re.compile(DIRECTION_PATTERN),
        re.compile(exchanger_pattern(list(PROVIDERS))),
    )
    for accepted in (" eth-usd ", "BTC-USD,eth-rub", ",,BTC-USD,"):
        assert direction.match(accepted)
        parse_query([accepted], None, providers=PROVIDERS)
    for accepted in ("binance", " Binance+CBR ", "bybit coingecko"):
        assert exchanger.match(accepted)
        parse_query([], accepted, providers=PROVIDERS)
    for refused in ("ßß-USD", "BTC_USD", "B-USD"):
        assert not direction.match(refused)
        with pytest.raises(InvalidCoursesQuery):
            parse_query([refused], None, providers=PROVIDERS)
    for refused in ("kraken", "binance+", "bınance"):
        assert not exchanger.match(refused)
        with pytest.raises(InvalidCoursesQuery):
            parse_query([], refused, providers=PROVIDERS)
