"""The route table (`edge.routes`) and Django answer alike: for the documented inputs of
`/courses`, item detail, candles, `/rates/{base}/{quote}` and `/convert` (GET and POST), drawn by
hypothesis, both entrances give the same status, headers (but the request id) and bytes, HEAD
included; and the route table is Django's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import LazySettings
from django.db import OperationalError
from django.urls import reverse
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.asgi import http_app
from edge.caching import IN_FRONT
from edge.routes import ROUTES
from edge.tests.asgi import Answer, DjangoCalls, both, call, counting
from items.models import Item
from rates.courses import courses_cache
from rates.detail import item_details
from rates.exceptions import PairNotPriced, ProvidersUnavailable
from rates.models import CurrentRate, Rate
from rates.ondemand import PairRate, on_demand
from rates.snapshot import RatesSnapshot, snapshot

COURSES = "/api/v1/courses"
CONVERT = "/api/v1/convert"
# Function-scoped fixtures hold for every example: each one's state is what the test sets up.
examples = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def django_calls() -> Iterator[DjangoCalls]:
    """Counts the requests the edge passed on to Django."""
    with counting() as calls:
        yield calls


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """One `now` for both entrances: ages and statuses are judged at the same moment."""
    now = datetime.now(UTC)
    monkeypatch.setattr(timezone, "now", lambda: now)
    return now


def test_every_route_of_the_table_is_one_of_django_s() -> None:
    kwargs: dict[str, dict[str, Any]] = {
        "get_item": {"item_id": 1},
        "pair_rate": {"base": "BTC", "quote": "USD"},
        "list_candles": {"item_id": 1},
    }
    for name, method in ROUTES:
        path = reverse(name, kwargs=kwargs.get(name.split(":")[1]))
        assert path.startswith("/api/v1/"), (name, method)


# --- /courses ----------------------------------------------------------------------------------
def put(code: str, value: str, provider: str, age_s: float = 1.0) -> None:
    moment = datetime.now(UTC) - timedelta(seconds=age_s)
    snapshot.apply_rate(
        {"direction": code, "value": value, "provider": provider, "source_time": moment}
    )


@pytest.fixture
def courses(settings: LazySettings) -> Iterator[None]:
    """A loaded snapshot: fresh, stale, cross and never-quoted pairs, and an inactive one."""
    settings.KURS_STALE_AFTER = 30
    snapshot.reset()
    snapshot.load()  # the seeded pairs, no rate yet; then events, as the bridge applies them
    for code in ("BTC-USD", "BTC-RUB", "ETH-USD", "ETH-RUB", "USD-RUB", "USDTTRC-USD"):
        snapshot.apply_item("item.created", {"code": code, "is_active": True})
    for code in ("DOGE-USD", "USDTERC-USD", "USDTERC-RUB", "USDTTRC-RUB"):
        snapshot.apply_item("item.updated", {"code": code, "is_active": False})
    put("BTC-USD", "54000.000000000000000123", "binance")
    put("BTC-RUB", "5000000.5", "coingecko")
    put("ETH-USD", "3000.25", "binance", age_s=45)
    put("ETH-RUB", "280000", "binance+cbr")
    put("USD-RUB", "80.1234", "cbr", age_s=3600)
    courses_cache.clear()
    yield
    snapshot.reset()
    courses_cache.clear()


DIRECTIONS = st.sampled_from(
    [
        *("BTC-USD", "btc-usd", "ETH-RUB", " eth-usd ", "USDTTRC-USD", "DOGE-USD", "XYZ-ABC"),
        *("BTC_USD", "", "BTC-USD,eth-usd", "%FF%FE", "A" * 13 + "-USD", "x"),
    ]
)
EXCHANGERS = st.sampled_from(
    ["", "binance", "BINANCE", "bybit", "cbr", "binance%2Bcbr", "binance+cbr", "kraken", "z" * 300]
)
FIELDS = st.lists(
    st.one_of(
        st.tuples(st.just("direction"), DIRECTIONS),
        st.tuples(st.just("exchanger"), EXCHANGERS),
        st.tuples(st.sampled_from(["foo", "direction[]"]), st.sampled_from(["", "bar"])),
    ),
    max_size=4,
)


def query_of(fields: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{name}={value}" for name, value in fields).encode()


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
@examples
@given(fields=FIELDS, method=st.sampled_from(["GET", "HEAD"]), etag=st.booleans())
async def test_courses_are_the_same_on_both_entrances(
    fields: list[tuple[str, str]], method: str, etag: bool
) -> None:
    query = query_of(fields)
    headers = []
    if etag:
        current = (await call(COURSES, query)).header(b"ETag") or b'"none"'
        headers = [(b"if-none-match", b'"other", W/' + current)]
    with counting() as django:
        fast, slow = await both(COURSES, query, headers, method=method)
    assert django.count == 1  # only the second went through Django
    assert fast.comparable() == slow.comparable()
    assert fast.status in (200, 304, 422)
    if fast.status == 304:
        assert fast.header(b"Content-Length") is None  # RFC 9110 8.6
        assert fast.body == b""


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_headers_with_underscores_are_ignored_on_both_entrances() -> None:
    # Django drops them (no `If_None_Match` posing as If-None-Match): so does the edge.
    fast, slow = await both(COURSES, b"", [(b"if_none_match", b"*"), (b"x_request_id", b"x" * 9)])
    assert fast.comparable() == slow.comparable()
    assert fast.status == 200
    assert fast.header(b"X-Request-ID") != b"x" * 9


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_answer_is_the_seed_format_with_mixed_and_stale() -> None:
    answer = await call(COURSES)
    assert answer.status == 200
    assert answer.header(b"Cache-Control") == IN_FRONT.encode()
    assert answer.header(b"Content-Length") == str(len(answer.body)).encode()
    assert answer.json() == {
        "exchanger": "mixed",
        "courses": [
            {"direction": "BTC-RUB", "value": Decimal("5000000.5"), "exchanger": "coingecko"},
            {
                "direction": "BTC-USD",
                "value": Decimal("54000.000000000000000123"),
                "exchanger": "binance",
            },
            {"direction": "ETH-RUB", "value": 280000, "exchanger": "binance+cbr"},
            {
                "direction": "ETH-USD",
                "value": Decimal("3000.25"),
                "exchanger": "binance",
                "stale": True,
            },
            {"direction": "USD-RUB", "value": Decimal("80.1234"), "exchanger": "cbr"},
        ],
    }


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_a_remembered_answer_never_outlives_a_snapshot_change() -> None:
    query = b"direction=BTC-USD"
    first = await call(COURSES, query)
    etag = first.header(b"ETag")
    assert etag is not None
    assert (await call(COURSES, query, [(b"if-none-match", etag)])).status == 304
    put("BTC-USD", "54001.5", "bybit")
    fast, slow = await both(COURSES, query, [(b"if-none-match", etag)])
    assert fast.comparable() == slow.comparable()
    assert fast.status == 200
    assert json.loads(fast.body) == {
        "exchanger": "bybit",
        "courses": [{"direction": "BTC-USD", "value": 54001.5}],
    }


@pytest.mark.django_db(transaction=True)
async def test_before_the_snapshot_is_loaded_django_loads_it_and_answers(
    django_calls: DjangoCalls,
) -> None:
    snapshot.reset()
    courses_cache.clear()
    await Item.objects.all().adelete()
    item = await Item.objects.acreate(base="BTC", quote="USD")
    now = datetime.now(UTC)
    await CurrentRate.objects.acreate(
        item=item,
        provider="binance",
        value=Decimal("54000.5"),
        source_time=now,
        checked_at=now,
        received_at=now,
        status="live",
        version=1,
    )
    try:
        answer = await call(COURSES)
        assert django_calls.count == 1
        assert answer.status == 200
        assert json.loads(answer.body)["courses"] == [{"direction": "BTC-USD", "value": 54000.5}]
        await call(COURSES)
        assert django_calls.count == 1  # loaded now: the route table answers
    finally:
        snapshot.reset()
        courses_cache.clear()


@pytest.mark.django_db
async def test_an_unreadable_database_answers_a_json_503_not_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unmigrated(self: RatesSnapshot) -> None:
        raise OperationalError("no such table: items_item")  # what SQLite says before migrate

    snapshot.reset()
    monkeypatch.setattr(RatesSnapshot, "load", unmigrated)
    for method in ("GET", "HEAD"):
        answer = await call(COURSES, method=method)
        assert answer.status == 503
        assert answer.header(b"Content-Type") == b"application/json; charset=utf-8"
        if method == "GET":
            assert answer.json() == {
                "detail": "courses are unavailable: the database cannot be read"
            }


# --- item detail, /rates/{base}/{quote}, /convert -------------------------------------------
@pytest.fixture
def rated(settings: LazySettings, frozen: datetime) -> Iterator[dict[str, Item]]:
    """Current rates in the database and the snapshot loaded from them: a live rate with bid
    and ask, a derived one in failover with its route, a stale one, and a pair never quoted.

    Tests using it are transactional: the route table reads in another thread, which must see
    committed rows (and SQLite's in-memory test database locks tables a transaction wrote)."""
    settings.KURS_STALE_AFTER = 30
    settings.KURS_API_KEYS_REQUIRED = False
    settings.KURS_PROVIDERS = ["binance", "bybit", "coingecko", "cbr"]
    now = frozen
    # Created when missing: a transactional test before this one may have flushed the seeds.
    items = {
        code: Item.objects.get_or_create(base=code.split("-")[0], quote=code.split("-")[1])[0]
        for code in ("BTC-USD", "ETH-RUB", "ETH-USD", "BTC-RUB")
    }

    def current(code: str, provider: str, value: str, age_s: float, **extra: Any) -> None:
        moment = now - timedelta(seconds=age_s)
        CurrentRate.objects.create(
            item=items[code],
            provider=provider,
            value=Decimal(value),
            source_time=moment,
            checked_at=extra.pop("checked_at", moment),
            received_at=moment,
            **extra,
        )

    current(
        "BTC-USD",
        "binance",
        "54000.000000000000000123",
        2,
        bid=Decimal("53999.5"),
        ask=Decimal("54000.5"),
        checked_at=now - timedelta(seconds=1.2345),
        status="live",
        version=3,
    )
    legs = [("ETH-USDT", "binance", "3000.5", 3), ("USD-RUB", "cbr", "80.1", 3600)]
    route = [
        {
            "pair": p,
            "provider": n,
            "value": v,
            "source_time": (now - timedelta(seconds=a)).isoformat(),
        }
        for p, n, v, a in legs
    ]
    current(
        "ETH-RUB",
        "binance+cbr",
        "240340.05",
        3,
        derived=True,
        route=route,
        status="failover",
        version=7,
    )
    current("ETH-USD", "binance", "3000.25", 45, status="live", version=2)
    snapshot.reset()
    snapshot.load()
    item_details.invalidate()
    on_demand.clear()
    courses_cache.clear()
    yield items
    snapshot.reset()
    item_details.invalidate()
    on_demand.clear()
    courses_cache.clear()


def item_path(item: Item) -> str:
    return f"/api/v1/items/{item.id}"


@pytest.mark.django_db(transaction=True)
@examples
@given(
    pick=st.one_of(
        st.sampled_from(["BTC-USD", "ETH-RUB", "ETH-USD", "BTC-RUB"]),
        st.integers(min_value=-5, max_value=2**64).map(str),
        st.sampled_from(["00", "0", "abc", "1/", "9" * 20]),
    ),
    method=st.sampled_from(["GET", "HEAD"]),
)
async def test_item_detail_is_the_same_on_both_entrances(
    rated: dict[str, Item], pick: str, method: str
) -> None:
    path = item_path(rated[pick]) if pick in rated else f"/api/v1/items/{pick}"
    fast, slow = await both(path, method=method)
    assert fast.comparable() == slow.comparable()
    assert fast.status in (200, 404)
    if pick in rated and method == "GET":
        latest = fast.json()["latest"]
        expected = {
            "BTC-USD": ("live", Decimal("1.234"), []),
            "ETH-RUB": ("failover", 3, ["ETH-USDT", "USD-RUB"]),
            "ETH-USD": ("stale", 45, []),
        }.get(pick)
        if expected is None:
            assert latest is None
        else:
            got = (latest["status"], latest["age_s"], [leg["pair"] for leg in latest["route"]])
            assert got == expected


@pytest.mark.django_db(transaction=True)
async def test_a_cached_item_is_judged_again_at_every_request(
    rated: dict[str, Item], frozen: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = item_path(rated["BTC-USD"])
    first = (await call(path)).json()["latest"]
    assert (first["status"], first["age_s"]) == ("live", Decimal("1.234"))
    reads = item_details.reads
    later = frozen + timedelta(seconds=40)  # past the 30 s freshness window, no event
    monkeypatch.setattr(timezone, "now", lambda: later)
    monkeypatch.setattr(item_details, "_clock", lambda: 0.0)  # the entry's own age stands
    fast = await call(path)
    assert item_details.reads == reads  # the same entry, judged anew
    latest = fast.json()["latest"]
    assert (latest["status"], latest["age_s"]) == ("stale", Decimal("41.234"))


@pytest.mark.django_db(transaction=True)
async def test_item_detail_is_read_once_and_served_from_memory(rated: dict[str, Item]) -> None:
    reads = item_details.reads
    answers = await asyncio.gather(*(call(item_path(rated["BTC-USD"])) for _ in range(20)))
    assert {answer.body for answer in answers} == {answers[0].body}
    assert item_details.reads == reads + 1  # concurrent misses share one read


@pytest.mark.django_db(transaction=True)
async def test_an_item_event_invalidates_the_item_cache(rated: dict[str, Item]) -> None:
    item = rated["BTC-USD"]
    assert (await call(item_path(item))).json()["name"] == item.name
    await Item.objects.filter(pk=item.pk).aupdate(name="Bitcoin, renamed")
    # What the bridge does with `item.updated` (from the API, the admin or another process).
    snapshot.apply_item("item.updated", {"id": item.pk, "code": item.code, "is_active": True})
    fast, slow = await both(item_path(item))
    assert fast.comparable() == slow.comparable()
    assert fast.json()["name"] == "Bitcoin, renamed"


@pytest.mark.django_db(transaction=True)
async def test_a_write_through_this_process_is_read_back_at_once(
    rated: dict[str, Item],
) -> None:
    item = rated["BTC-USD"]
    assert (await call(item_path(item))).json()["name"] == item.name
    patch = await call(
        item_path(item),
        method="PATCH",
        headers=[(b"content-type", b"application/json")],
        body=b'{"name": "Renamed here"}',
    )
    assert patch.status == 200
    # No event has come back yet (no bridge runs here): the write's own event invalidated it.
    assert (await call(item_path(item))).json()["name"] == "Renamed here"
    delete = await call(item_path(item), method="DELETE")
    assert delete.status == 204
    assert (await call(item_path(item))).status == 404


def remember(code: str, result: PairRate | Exception) -> None:
    # The cache's own entry point, given a test's stand-in answer.
    on_demand._remember(code, result, 60.0)  # type: ignore[arg-type]


def remember_untracked(frozen: datetime) -> None:
    remember(
        "SOL-USD",
        PairRate(
            pair="SOL-USD",
            value=Decimal("141.23"),
            provider="binance",
            source_time=frozen - timedelta(seconds=1),
            fresh_until=frozen + timedelta(seconds=29),
            derived=False,
            failover=True,
        ),
    )
    remember("AAA-BBB", PairNotPriced("no provider prices AAA-BBB, directly or as a cross rate"))
    remember("CCC-DDD", ProvidersUnavailable("no provider could price CCC-DDD now (binance: 500)"))


# Tracked, remembered (an answer, a 404, a 503) and invalid codes: no lookup leaves the process.
ASSETS = st.sampled_from(
    ["BTC", "btc", "ETH", "USD", "RUB", "SOL", "AAA", "BBB", "CCC", "DDD", "B", "BTC-USD", "%20BTC"]
)
KNOWN_PAIRS = {"BTC-USD", "ETH-RUB", "ETH-USD", "SOL-USD", "AAA-BBB", "CCC-DDD", "BTC-RUB"}


def offline(base: str, quote: str) -> bool:
    """Whether the pair is answered without asking an exchange (known, or invalid input)."""
    code = f"{base.upper()}-{quote.upper()}"
    valid = all(c.isalnum() and 2 <= len(c) <= 12 for c in (base, quote))
    return not valid or base.upper() == quote.upper() or code in KNOWN_PAIRS


@pytest.mark.django_db(transaction=True)
@examples
@given(base=ASSETS, quote=ASSETS, method=st.sampled_from(["GET", "HEAD"]))
async def test_any_pair_is_the_same_on_both_entrances(
    rated: dict[str, Item], frozen: datetime, base: str, quote: str, method: str
) -> None:
    if not offline(base, quote):
        remember(f"{base.upper()}-{quote.upper()}", PairNotPriced("not listed here"))
    remember_untracked(frozen)
    fast, slow = await both(f"/api/v1/rates/{base}/{quote}", method=method)
    assert fast.comparable() == slow.comparable()
    assert fast.status in (200, 404, 422, 503)


AMOUNTS = st.one_of(
    st.sampled_from(["0.5", "1000", "2", "0", "-1", "abc", "1e3", "", "1_000", " 0.5"]),
    st.decimals(min_value=0, max_value=10**6, places=8, allow_nan=False).map(str),
)
CONVERT_FIELDS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["from", "to"]), ASSETS),
        st.tuples(st.just("amount"), AMOUNTS),
        st.tuples(st.just("x"), st.just("1")),
    ),
    max_size=5,
)


def convert_offline(fields: list[tuple[str, str]]) -> None:
    given = dict(fields)
    base, quote = given.get("from", "BTC"), given.get("to", "USD")
    if not offline(base, quote):
        remember(f"{base.upper()}-{quote.upper()}", PairNotPriced("not listed here"))


@pytest.mark.django_db(transaction=True)
@examples
@given(fields=CONVERT_FIELDS)
async def test_convert_by_query_is_the_same_on_both_entrances(
    rated: dict[str, Item], frozen: datetime, fields: list[tuple[str, str]]
) -> None:
    remember_untracked(frozen)
    convert_offline(fields)
    fast, slow = await both(CONVERT, query_of(fields))
    assert fast.comparable() == slow.comparable()
    assert fast.status in (200, 404, 422, 503)


JSON_VALUES = st.one_of(
    ASSETS, AMOUNTS, st.integers(-2, 10**6), st.floats(allow_nan=True), st.none(), st.just([1])
)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(["from", "to", "amount", "x"]), JSON_VALUES, max_size=4).map(
        lambda d: json.dumps(d).encode()
    ),
    st.sampled_from(
        [
            *(b"{not json", b"", b'["BTC", "USD", 1]'),
            b'{"from": "BTC", "to": "USD", "amount": NaN}',
            b'{"amount": 2.000000000000000001, "to": "usd", "from": "eth"}',
            b'{"from": "BTC", "to": "USD", "amount": "1", "pad": "' + b"x" * 5000 + b'"}',
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(
    [
        [(b"content-type", b"application/json")],
        [(b"content-type", b"application/json; charset=utf-8")],
        [(b"content-type", b"text/plain")],
        [],
        [(b"content-type", b"application/json")] * 2,
    ]
)


@pytest.mark.django_db(transaction=True)
@examples
@given(body=BODIES, headers=CONTENT_TYPES)
async def test_convert_by_body_is_the_same_on_both_entrances(
    rated: dict[str, Item], frozen: datetime, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    remember_untracked(frozen)
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        convert_offline([(k, v) for k, v in parsed.items() if isinstance(v, str)])
    fast, slow = await both(CONVERT, b"", headers, method="POST", body=body)
    assert fast.comparable() == slow.comparable()
    assert fast.status in (200, 400, 404, 415, 422, 503)


# --- candles -----------------------------------------------------------------------------------
@pytest.fixture
def history(rated: dict[str, Item], frozen: datetime) -> dict[str, Item]:
    """BTC-USD's history in the last minutes: binance's rows at bucket edges and bybit's and a
    cross rate's beside them (never mixed into binance's candles)."""
    minute = frozen.replace(second=0, microsecond=0)
    rows = [
        ("binance", minute - timedelta(minutes=3), "100"),
        ("binance", minute - timedelta(minutes=3) + timedelta(seconds=30), "105.5"),
        ("binance", minute - timedelta(minutes=2), "54000.000000000000000123"),
        ("binance", minute - timedelta(minutes=2), "7"),
        ("binance", minute - timedelta(seconds=1), "99.000000000000000001"),
        ("bybit", minute - timedelta(minutes=2, seconds=-10), "1"),
        ("binance+cbr", minute - timedelta(minutes=1), "2"),
    ]
    for provider, at, value in rows:
        Rate.objects.create(
            item=rated["BTC-USD"],
            provider=provider,
            value=Decimal(value),
            source_time=at,
            received_at=at,
        )
    return rated


TIMES = st.sampled_from(
    [
        *("", "2026-03-14T00:00:00Z", "2026-03-14T00:00:00", "0001-01-01T00:00:00Z"),
        *("9999-12-31T23:59:59Z", "0.5", "yesterday", "2026-13-01T00:00:00Z"),
    ]
)
CANDLE_FIELDS = st.lists(
    st.one_of(
        st.tuples(st.just("interval"), st.sampled_from(["1m", "5m", "1h", "1d", "", "2m", "1M"])),
        st.tuples(st.sampled_from(["since", "until"]), TIMES),
        st.tuples(
            st.just("provider"),
            st.sampled_from(["", "binance", "bybit", "binance+cbr", "binance%2Bcbr", "BAD!"]),
        ),
        st.tuples(st.just("x"), st.just("1")),
    ),
    max_size=4,
)


@pytest.mark.django_db(transaction=True)
@examples
@given(
    pick=st.one_of(
        st.sampled_from(["BTC-USD", "ETH-USD"]), st.sampled_from(["0", "999999", "9" * 20])
    ),
    fields=CANDLE_FIELDS,
    method=st.sampled_from(["GET", "HEAD"]),
)
async def test_candles_are_the_same_on_both_entrances(
    history: dict[str, Item], pick: str, fields: list[tuple[str, str]], method: str
) -> None:
    item = str(history[pick].id) if pick in history else pick
    fast, slow = await both(f"/api/v1/items/{item}/candles", query_of(fields), method=method)
    assert fast.comparable() == slow.comparable()
    assert fast.status in (200, 404, 422)


@pytest.mark.django_db(transaction=True)
async def test_candles_are_answered_by_the_route_table_with_their_provider(
    history: dict[str, Item], frozen: datetime
) -> None:
    path = f"/api/v1/items/{history['BTC-USD'].id}/candles"
    with counting() as django:
        fast = await call(path)
        by_bybit = await call(path, b"provider=bybit&interval=5m")
    assert django.count == 0
    assert fast.status == 200
    assert fast.header("Kurs-Provider") == b"binance"
    assert fast.header("Cache-Control") == b"max-age=1"
    minute = frozen.replace(second=0, microsecond=0)
    got = [(c["t"], c["open"], c["high"], c["low"], c["close"], c["n"]) for c in fast.json()]
    assert got == [
        (iso(minute - timedelta(minutes=3)), 100, Decimal("105.5"), 100, Decimal("105.5"), 2),
        (iso(minute - timedelta(minutes=2)), Decimal("54000.000000000000000123"),
         Decimal("54000.000000000000000123"), 7, 7, 2),
        (iso(minute - timedelta(minutes=1)), *[Decimal("99.000000000000000001")] * 4, 1),
    ]  # fmt: skip
    assert by_bybit.header("Kurs-Provider") == b"bybit"
    assert [c["n"] for c in by_bybit.json()] == [1]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "query", "route"),
    [
        (COURSES, b"", "api/v1/courses"),
        ("/api/v1/items/{id}", b"", "api/v1/items/<int:item_id>"),
        ("/api/v1/rates/BTC/USD", b"", "api/v1/rates/<base>/<quote>"),
        (CONVERT, b"from=BTC&to=USD&amount=1", "api/v1/convert"),
    ],
)
async def test_both_entrances_count_requests_under_django_s_route_labels(
    rated: dict[str, Item], path: str, query: bytes, route: str
) -> None:
    from prometheus_client import REGISTRY

    from edge.metrics import request_tally

    path = path.format(id=rated["BTC-USD"].id)
    labels = {"method": "GET", "route": route, "status": "200"}
    request_tally.flush()
    before = REGISTRY.get_sample_value("kurs_http_requests_total", labels) or 0
    await both(path, query)
    request_tally.flush()
    assert REGISTRY.get_sample_value("kurs_http_requests_total", labels) == before + 2


# --- lifespan ------------------------------------------------------------------------------
async def test_the_lifespan_shutdown_closes_the_on_demand_http_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from config import asgi

    async def bridge_lifespan(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    monkeypatch.setattr(asgi, "bridge_lifespan", bridge_lifespan)
    on_demand._upstream()  # this event loop's HTTP client, as the first on-demand lookup makes it
    client = on_demand._upstreams[asyncio.get_running_loop()].client
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        messages.put_nowait({"type": kind})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        assert not client.is_closed or message["type"] == "lifespan.shutdown.complete"
        sent.append(message)

    await asgi.lifespan({"type": "lifespan"}, messages.get, send)
    assert client.is_closed
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_the_http_app_is_the_edge() -> None:
    from edge.layer import EdgeLayer

    assert isinstance(http_app, EdgeLayer)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("method", "path", "query", "body"),
    [
        ("GET", "/api/v1/items/{id}", b"", b""),
        ("GET", "/api/v1/rates/btc/usd", b"", b""),
        ("GET", CONVERT, b"from=BTC&to=USD&amount=0.5", b""),
        ("POST", CONVERT, b"", b'{"from": "ETH", "to": "RUB", "amount": 1}'),
        ("HEAD", "/api/v1/items/{id}", b"", b""),
    ],
)
async def test_the_route_table_answers_valid_input_itself(
    rated: dict[str, Item], method: str, path: str, query: bytes, body: bytes
) -> None:
    headers = [(b"content-type", b"application/json")] if body else []
    path = path.format(id=rated["BTC-USD"].id)
    with counting() as django:
        fast, slow = await both(path, query, headers, method=method, body=body)
    assert django.count == 1  # the second request only
    assert fast.comparable() == slow.comparable()
    assert fast.status == 200
    assert (fast.body == b"") is (method == "HEAD")


def test_an_answer_compares_without_its_request_id() -> None:
    one = Answer(200, [(b"X-Request-ID", b"a" * 8), (b"B", b"1")], b"x")
    two = Answer(200, [(b"b", b"1"), (b"x-request-id", b"b" * 8)], b"x")
    assert one.comparable() == two.comparable()
    assert one.comparable() != Answer(200, [(b"B", b"2")], b"x").comparable()
