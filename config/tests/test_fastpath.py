"""The fast path (`config/fastpath.py`) answers exactly what the ninja routes answer: the same
status, headers and bytes for `/courses`, item detail, `/rates/{base}/{quote}` and `/convert`,
HEAD included; what it does not serve reaches Django unchanged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import LazySettings
from django.core.handlers.asgi import ASGIHandler
from django.db import OperationalError
from django.utils import timezone

from config import asgi
from config.asgi import http_app
from config.metrics import HTTP_REQUESTS, request_tally
from items.models import Item
from rates.courses import courses_cache
from rates.detail import item_details
from rates.exceptions import PairNotPriced, ProvidersUnavailable
from rates.models import CurrentRate
from rates.ondemand import PairRate, on_demand
from rates.snapshot import RatesSnapshot, snapshot

Message = dict[str, Any]
REQUEST_ID = b"fastpath-test-0001"
COURSES = "/api/v1/courses"
HOST = b"127.0.0.1:8000"


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as the client sees it: the body is every body message's bytes."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body, parse_float=Decimal)


async def call(
    path: str = COURSES,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: str = "GET",
    host: bytes = HOST,
    scheme: str = "http",
    body: bytes = b"",
) -> Answer:
    """One request through the project's HTTP app, as a server would hand it over."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        # A fixed request id: both doors echo it, so their headers can be compared exactly.
        "headers": [(b"host", host), (b"x-request-id", REQUEST_ID), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    hang = asyncio.Event()  # after the body, a client that stays connected

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await hang.wait()
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await http_app(scope, receive, send)
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert not bodies[-1].get("more_body", False)
    return Answer(
        start["status"], list(start["headers"]), b"".join(m.get("body", b"") for m in bodies)
    )


class DjangoCalls:
    def __init__(self) -> None:
        self.count = 0


@contextmanager
def counting(django_app: Any) -> Iterator[DjangoCalls]:
    """`django_app` behind the fast path, counting the requests passed on to it."""
    calls = DjangoCalls()
    previous = http_app.app

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        calls.count += 1
        await django_app(scope, receive, send)

    http_app.app = counted
    try:
        yield calls
    finally:
        http_app.app = previous


@pytest.fixture
def django_calls() -> Iterator[DjangoCalls]:
    """Counts the requests the fast path passed on to Django."""
    with counting(http_app.app) as calls:
        yield calls


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """One `now` for both doors: ages and statuses are judged at the same moment."""
    now = datetime.now(UTC)
    monkeypatch.setattr(timezone, "now", lambda: now)
    return now


def put(code: str, value: str, provider: str, age_s: float = 1.0) -> None:
    moment = datetime.now(UTC) - timedelta(seconds=age_s)
    snapshot.apply_rate(
        {"direction": code, "value": value, "provider": provider, "source_time": moment}
    )


@pytest.fixture
def courses(settings: LazySettings) -> Iterator[None]:
    """A loaded snapshot: fresh, stale, cross and never-quoted pairs, and an inactive one."""
    settings.KURS_STALE_AFTER = 30
    settings.KURS_RATE_LIMIT = None
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
    http_app.enabled = True
    yield
    http_app.enabled = True
    snapshot.reset()
    courses_cache.clear()


async def both(path: str, query: bytes = b"", headers: Any = None, **kw: Any) -> Any:
    http_app.enabled = True
    fast = await call(path, query, headers, **kw)
    http_app.enabled = False
    try:
        slow = await call(path, query, headers, **kw)
    finally:
        http_app.enabled = True
    return fast, slow


QUERIES = [
    b"",
    b"direction=BTC-USD",
    b"direction=btc-usd&direction=ETH-RUB",
    b"direction=ETH-RUB&direction=BTC-USD",
    b"direction=BTC-USD,eth-usd&direction=BTC-USD",
    b"direction=USDTTRC-USD",  # active, never quoted
    b"direction=%20btc-usd%20",
    b"direction=&exchanger=",
    b"exchanger=binance",
    b"exchanger=BINANCE&direction=BTC-RUB",
    b"exchanger=bybit",
    b"exchanger=coingecko&exchanger=cbr",
    b"exchanger=binance%2Bcbr",
    b"exchanger=binance+cbr",
    b"direction=USD-RUB&exchanger=cbr",
    b"foo=bar&direction=ETH-USD",
    # Errors: malformed, unknown, inactive, too many, unknown provider, undecodable.
    b"direction=BTC_USD",
    b"direction=XYZ-ABC",
    b"direction=DOGE-USD",
    b"direction=" + b",".join(b"A%03d-USD" % i for i in range(101)),
    b"exchanger=kraken",
    b"direction=x&exchanger=kraken",
    b"direction=%FF%FE",
    b"exchanger=" + b"z" * 300,
]


# --- /courses ----------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
@pytest.mark.parametrize("query", QUERIES, ids=[q.decode()[:40] or "(none)" for q in QUERIES])
async def test_both_paths_answer_identical_status_headers_and_bytes(
    query: bytes, django_calls: DjangoCalls
) -> None:
    fast, slow = await both(COURSES, query)
    assert django_calls.count == 1  # only the second call went through Django
    assert fast == slow
    assert fast.status in (200, 422)


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_both_paths_answer_the_same_304_to_the_current_etag(
    django_calls: DjangoCalls,
) -> None:
    etag = (await call()).header(b"ETag")
    assert etag is not None
    for header in (etag, b'"other", W/' + etag, b"*"):
        fast, slow = await both(COURSES, b"", [(b"if-none-match", header)])
        assert fast == slow
        assert fast.status == 304
        assert fast.body == b""
        assert fast.header(b"ETag") == etag
    fast, slow = await both(COURSES, b"", [(b"if-none-match", b'"stale-etag"')])
    assert fast == slow
    assert fast.status == 200
    # Another filter has its own body and ETag: the first one's does not answer 304 there.
    fast, slow = await both(COURSES, b"direction=BTC-USD", [(b"if-none-match", etag)])
    assert fast == slow
    assert fast.status == 200


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_a_304_sends_no_content_length_on_either_door() -> None:
    # RFC 9110 8.6: a 304 may repeat only the 200's length; `Content-Length: 0` misleads.
    etag = (await call()).header(b"ETag")
    assert etag is not None
    for answer in await both(COURSES, b"", [(b"if-none-match", etag)]):
        assert answer.status == 304
        assert answer.header(b"Content-Length") is None
        assert answer.header(b"Content-Type") is None


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_answer_is_the_seed_format_with_mixed_and_stale() -> None:
    answer = await call()
    assert answer.status == 200
    assert answer.header(b"Cache-Control") == b"max-age=1"
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
@pytest.mark.parametrize("query", [b"", b"direction=BTC-USD", b"direction=nope"])
async def test_head_answers_like_get_without_a_body_on_both_doors(
    query: bytes, django_calls: DjangoCalls
) -> None:
    get = await call(COURSES, query)
    fast, slow = await both(COURSES, query, method="HEAD")
    assert django_calls.count == 1
    assert fast == slow == Answer(get.status, get.headers, b"")
    etag = get.header(b"ETag")
    if etag is not None:
        fast, slow = await both(COURSES, query, [(b"if-none-match", etag)], method="HEAD")
        assert fast == slow
        assert fast.status == 304


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_headers_with_underscores_are_ignored_on_both_doors() -> None:
    # Django drops them (no `If_None_Match` posing as If-None-Match): so does the fast path.
    fast, slow = await both(COURSES, b"", [(b"if_none_match", b"*"), (b"x_request_id", b"x" * 9)])
    assert fast == slow
    assert fast.status == 200


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
@pytest.mark.parametrize(
    ("method", "host", "headers"),
    [
        ("POST", HOST, []),
        ("GET", b"evil.example", []),
        ("GET", HOST, [(b"host", b"localhost")]),  # two Host headers: Django's 400
    ],
)
async def test_what_the_fast_path_does_not_serve_goes_to_django_unchanged(
    method: str, host: bytes, headers: list[tuple[bytes, bytes]], django_calls: DjangoCalls
) -> None:
    fast, slow = await both(COURSES, b"", headers, method=method, host=host)
    assert django_calls.count == 2
    assert fast == slow
    assert fast.status in (400, 405)


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_with_a_rate_limit_courses_are_served_and_limited_by_django(
    settings: LazySettings, django_calls: DjangoCalls
) -> None:
    settings.KURS_RATE_LIMIT = (2, 60)
    statuses = [(await call(host=b"localhost")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert django_calls.count == 3


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
        answer = await call()
        assert django_calls.count == 1
        assert answer.status == 200
        assert json.loads(answer.body)["courses"] == [{"direction": "BTC-USD", "value": 54000.5}]
        await call()
        assert django_calls.count == 1  # loaded now: the fast path serves
    finally:
        snapshot.reset()
        courses_cache.clear()


@pytest.mark.django_db
async def test_an_unreadable_database_answers_a_json_503_not_a_500(
    monkeypatch: pytest.MonkeyPatch, settings: LazySettings
) -> None:
    settings.KURS_RATE_LIMIT = None

    def unmigrated(self: RatesSnapshot) -> None:
        raise OperationalError("no such table: items_item")  # what SQLite says before migrate

    snapshot.reset()
    monkeypatch.setattr(RatesSnapshot, "load", unmigrated)
    for method in ("GET", "HEAD"):
        answer = await call(method=method)
        assert answer.status == 503
        assert answer.header(b"Content-Type") == b"application/json; charset=utf-8"
        if method == "GET":
            assert answer.json() == {
                "detail": "courses are unavailable: the database cannot be read"
            }


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_fast_path_never_answers_from_a_memo_the_snapshot_has_moved_past() -> None:
    query = b"direction=BTC-USD"
    first = await call(COURSES, query)
    etag = first.header(b"ETag")
    assert etag is not None
    assert (await call(COURSES, query, [(b"if-none-match", etag)])).status == 304
    put("BTC-USD", "54001.5", "bybit")
    fast, slow = await both(COURSES, query, [(b"if-none-match", etag)])
    assert fast == slow
    assert fast.status == 200
    assert json.loads(fast.body) == {
        "exchanger": "bybit",
        "courses": [{"direction": "BTC-USD", "value": 54001.5}],
    }
    assert first.body != fast.body


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_fast_path_gives_a_request_id_and_logs_one_access_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="kurs.access")
    answer = await call(COURSES, b"direction=BTC-USD")
    assert answer.header(b"X-Request-ID") == REQUEST_ID
    [line] = [record for record in caplog.records if record.name == "kurs.access"]
    assert line.getMessage().startswith("GET /api/v1/courses?direction=BTC-USD 200 ")


# --- item detail, /rates/{base}/{quote}, /convert -------------------------------------------
@pytest.fixture
def rated(settings: LazySettings, frozen: datetime) -> Iterator[dict[str, Item]]:
    """Current rates in the database and the snapshot loaded from them: a live rate with bid
    and ask, a derived one in failover with its route, a stale one, and a pair never quoted.

    Tests using it are transactional: the fast path reads in another thread, which must see
    committed rows (and SQLite's in-memory test database locks tables a transaction wrote)."""
    settings.KURS_STALE_AFTER = 30
    settings.KURS_RATE_LIMIT = None
    settings.KURS_API_KEYS_REQUIRED = False
    settings.KURS_PROVIDERS = ["binance", "bybit", "coingecko", "cbr"]
    now = frozen
    # Created when missing: a transactional test before this one may have flushed the seeds.
    items = {
        code: Item.objects.get_or_create(base=code.split("-")[0], quote=code.split("-")[1])[0]
        for code in ("BTC-USD", "ETH-RUB", "ETH-USD", "BTC-RUB")
    }
    CurrentRate.objects.create(
        item=items["BTC-USD"],
        provider="binance",
        value=Decimal("54000.000000000000000123"),
        bid=Decimal("53999.5"),
        ask=Decimal("54000.5"),
        source_time=now - timedelta(seconds=2),
        checked_at=now - timedelta(seconds=1.2345),
        received_at=now - timedelta(seconds=2),
        status="live",
        version=3,
    )
    legs = [("ETH-USDT", "binance", "3000.5", 3), ("USD-RUB", "cbr", "80.1", 3600)]
    CurrentRate.objects.create(
        item=items["ETH-RUB"],
        provider="binance+cbr",
        value=Decimal("240340.05"),
        source_time=now - timedelta(seconds=3),
        checked_at=now - timedelta(seconds=3),
        received_at=now - timedelta(seconds=3),
        derived=True,
        route=[
            {
                "pair": p,
                "provider": n,
                "value": v,
                "source_time": (now - timedelta(seconds=a)).isoformat(),
            }
            for p, n, v, a in legs
        ],
        status="failover",
        version=7,
    )
    CurrentRate.objects.create(
        item=items["ETH-USD"],
        provider="binance",
        value=Decimal("3000.25"),
        source_time=now - timedelta(seconds=45),
        checked_at=now - timedelta(seconds=45),
        received_at=now - timedelta(seconds=45),
        status="live",
        version=2,
    )
    snapshot.reset()
    snapshot.load()
    item_details.invalidate()
    on_demand.clear()
    courses_cache.clear()
    http_app.enabled = True
    yield items
    http_app.enabled = True
    snapshot.reset()
    item_details.invalidate()
    on_demand.clear()
    courses_cache.clear()


def item_path(item: Item) -> str:
    return f"/api/v1/items/{item.id}"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("code", ["BTC-USD", "ETH-RUB", "ETH-USD", "BTC-RUB"])
async def test_item_detail_is_the_same_on_both_doors(
    rated: dict[str, Item], code: str, django_calls: DjangoCalls
) -> None:
    fast, slow = await both(item_path(rated[code]))
    assert django_calls.count == 1
    assert fast == slow
    assert fast.status == 200
    latest = fast.json()["latest"]
    expected = {
        "BTC-USD": ("live", Decimal("1.234"), []),
        "ETH-RUB": ("failover", 3, ["ETH-USDT", "USD-RUB"]),
        "ETH-USD": ("stale", 45, []),
    }.get(code)
    if expected is None:
        assert latest is None
    else:
        assert (latest["status"], latest["age_s"], [leg["pair"] for leg in latest["route"]]) == (
            expected
        )
    head_fast, head_slow = await both(item_path(rated[code]), method="HEAD")
    assert head_fast == head_slow == Answer(200, fast.headers, b"")


@pytest.mark.django_db(transaction=True)
async def test_a_cached_item_is_judged_again_at_every_request(
    rated: dict[str, Item], frozen: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = item_path(rated["BTC-USD"])
    reads = item_details.reads
    first = (await call(path)).json()["latest"]
    assert (first["status"], first["age_s"]) == ("live", Decimal("1.234"))
    later = frozen + timedelta(seconds=40)  # past the 30 s freshness window, no event
    monkeypatch.setattr(timezone, "now", lambda: later)
    fast, slow = await both(path)
    assert fast == slow
    assert item_details.reads == reads + 1  # the same entry, judged anew
    latest = fast.json()["latest"]
    assert (latest["status"], latest["age_s"]) == ("stale", Decimal("41.234"))


# (method, path, status, head_as_get): what the fast path hands to Django as it came, and
# Django's answer. `head_as_get`: a HEAD of a fast-path route goes on as its GET, the body dropped.
LEFT_TO_DJANGO_PATHS = [
    pytest.param("HEAD", "/api/v1/items/{id}/rates", 405, False, id="HEAD item rates"),
    pytest.param("HEAD", "/api/v1/items/{id}/", 404, False, id="HEAD item with a slash"),
    pytest.param("HEAD", "/api/v1/rates/BTC/USD/x", 404, False, id="HEAD below a pair"),
    pytest.param("HEAD", "/api/v1/rates/B/USD", 422, True, id="HEAD pair B/USD"),
    pytest.param("GET", "/api/v1/items/999999", 404, False, id="unknown item 999999"),
    pytest.param("GET", "/api/v1/items/0", 404, False, id="unknown item 0"),
    pytest.param("GET", "/api/v1/items/00", 404, False, id="unknown item 00"),
    pytest.param("GET", "/api/v1/items/" + "9" * 20, 404, False, id="item id out of range"),
    pytest.param("GET", "/api/v1/rates/BTC/btc", 422, False, id="pair BTC/btc"),
    pytest.param("GET", "/api/v1/rates/B/USD", 422, False, id="pair B/USD"),
    pytest.param("GET", "/api/v1/rates/BTC-USD/RUB", 422, False, id="pair BTC-USD/RUB"),
    pytest.param("GET", "/api/v1/rates/%20BTC/USD", 422, False, id="pair %20BTC/USD"),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("method", "path", "status", "head_as_get"), LEFT_TO_DJANGO_PATHS)
async def test_input_the_fast_path_does_not_check_is_left_to_django(
    rated: dict[str, Item],
    method: str,
    path: str,
    status: int,
    head_as_get: bool,
    django_calls: DjangoCalls,
) -> None:
    fast, slow = await both(path.format(id=rated["BTC-USD"].id), method=method)
    assert django_calls.count == 2
    assert fast == slow
    assert fast.status == status
    assert (fast.body == b"") is head_as_get


@pytest.mark.django_db(transaction=True)
async def test_item_detail_is_read_once_and_served_from_memory(rated: dict[str, Item]) -> None:
    reads = item_details.reads
    answers = await asyncio.gather(*(call(item_path(rated["BTC-USD"])) for _ in range(20)))
    assert {answer.body for answer in answers} == {answers[0].body}
    assert item_details.reads == reads + 1  # concurrent misses share one read
    await call(item_path(rated["BTC-USD"]))
    assert item_details.reads == reads + 1


@pytest.mark.django_db(transaction=True)
async def test_an_item_event_invalidates_the_item_cache(rated: dict[str, Item]) -> None:
    item = rated["BTC-USD"]
    assert (await call(item_path(item))).json()["name"] == item.name
    await Item.objects.filter(pk=item.pk).aupdate(name="Bitcoin, renamed")
    # What the bridge does with `item.updated` (from the API, the admin or another process).
    snapshot.apply_item("item.updated", {"id": item.pk, "code": item.code, "is_active": True})
    fast, slow = await both(item_path(item))
    assert fast == slow
    assert fast.json()["name"] == "Bitcoin, renamed"


@pytest.mark.django_db(transaction=True)
async def test_a_newer_rate_version_invalidates_the_item_cache(
    rated: dict[str, Item], frozen: datetime
) -> None:
    item = rated["BTC-USD"]
    assert (await call(item_path(item))).json()["latest"]["version"] == 3
    await CurrentRate.objects.filter(item=item).aupdate(
        value=Decimal("54100.5"), provider="bybit", version=4
    )
    snapshot.apply_rate(
        {
            "direction": item.code,
            "value": "54100.5",
            "provider": "bybit",
            "source_time": frozen,
            "version": 4,
        }
    )
    fast, slow = await both(item_path(item))
    assert fast == slow
    latest = fast.json()["latest"]
    assert (latest["value"], latest["provider"], latest["version"]) == (
        Decimal("54100.5"),
        "bybit",
        4,
    )


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
    # No event has come back yet (no bridge runs here): the write itself invalidated the cache.
    assert (await call(item_path(item))).json()["name"] == "Renamed here"
    delete = await call(item_path(item), method="DELETE")
    assert delete.status == 204
    assert (await call(item_path(item))).status == 404


def remember(code: str, result: PairRate | Exception) -> None:
    on_demand._remember(code, result, 60.0)  # type: ignore[arg-type]  # any error, cached


PAIRS = ["BTC/USD", "btc/usd", "ETH/RUB", "ETH/USD", "SOL/USD", "AAA/BBB", "CCC/DDD"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("pair", PAIRS)
async def test_any_pair_is_the_same_on_both_doors(
    rated: dict[str, Item], frozen: datetime, pair: str, django_calls: DjangoCalls
) -> None:
    # Untracked pairs from the on-demand cache: an answer, a 404 and a 503.
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
    fast, slow = await both(f"/api/v1/rates/{pair}")
    assert django_calls.count == 1
    assert fast == slow
    expected = {"AAA/BBB": 404, "CCC/DDD": 503}.get(pair, 200)
    assert fast.status == expected


CONVERSIONS = [
    b"from=BTC&to=USD&amount=0.5",
    b"amount=1000&to=RUB&from=eth",
    b"from=BTC&to=BTC&amount=2",
    b"from=BTC&to=USD&amount=0",
    b"from=AAA&to=BBB&amount=1",
]
# Left to Django (the fast path checks only the plain form), with Django's answer.
LEFT_TO_DJANGO = {
    b"from=BTC&to=USD&amount=-1": 422,
    b"from=BTC&to=USD&amount=abc": 422,
    b"amount=1e3&to=RUB&from=eth": 422,  # text amounts are plain notation
    b"from=BTC&to=USD&amount=": 422,
    b"from=BTC&to=USD": 422,
    b"from=B&to=USD&amount=1": 422,
    b"from=BTC&to=USD&amount=1&x=1": 200,  # ninja ignores unknown query parameters
    b"from=BTC&to=USD&amount=1&amount=2": 200,
}


# POST /convert: the same fields in a JSON body.
JSON_BODY = [(b"content-type", b"application/json")]
BODY_CONVERSIONS = [
    b'{"from": "BTC", "to": "USD", "amount": "0.5"}',
    b'{"amount": 2.000000000000000001, "to": "usd", "from": "eth"}',  # a JSON number, exact
    b'{"from": "ETH", "to": "RUB", "amount": 1}',
    b'{"from": "AAA", "to": "BBB", "amount": "1"}',  # no provider prices it: 404
]
# Left to Django, with Django's answer: bad input (its 422s) and what the fast path does not read.
BODY_LEFT_TO_DJANGO = {
    b'{"from": "BTC", "to": "USD", "amount": "-1"}': 422,
    b'{"from": "BTC", "to": "USD", "amount": "1", "x": 1}': 422,  # extra keys are forbidden
    b'{"from": "BTC", "to": "USD"}': 422,
    b'{"from": "B", "to": "USD", "amount": "1"}': 422,
    b'{"from": "BTC", "to": "USD", "amount": NaN}': 422,
    b'["BTC", "USD", 1]': 422,
    b"{not json": 400,
    b"": 422,
    b'{"from": "BTC", "to": "USD", "amount": "1", "pad": "' + b"x" * 5000 + b'"}': 422,
}


CONVERT_CASES = [
    *(("GET", query) for query in CONVERSIONS + list(LEFT_TO_DJANGO)),
    *(("POST", body) for body in BODY_CONVERSIONS + list(BODY_LEFT_TO_DJANGO)),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("method", "given"), CONVERT_CASES)
async def test_convert_is_the_same_on_both_doors(
    rated: dict[str, Item], method: str, given: bytes, django_calls: DjangoCalls
) -> None:
    remember("AAA-BBB", PairNotPriced("no provider prices AAA-BBB, directly or as a cross rate"))
    if method == "GET":
        fast, slow = await both("/api/v1/convert", given)
    else:
        fast, slow = await both("/api/v1/convert", b"", JSON_BODY, method="POST", body=given)
    assert fast == slow
    if given in CONVERSIONS or given in BODY_CONVERSIONS:
        assert django_calls.count == 1  # only the slow door's
        assert fast.status == (404 if b"AAA" in given else 200)
    else:
        assert django_calls.count == 2
        assert fast.status == {**LEFT_TO_DJANGO, **BODY_LEFT_TO_DJANGO}[given]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "query", "route"),
    [
        (COURSES, b"", "api/v1/courses"),
        ("/api/v1/items/{id}", b"", "api/v1/items/<int:item_id>"),
        ("/api/v1/rates/BTC/USD", b"", "api/v1/rates/<base>/<quote>"),
        ("/api/v1/convert", b"from=BTC&to=USD&amount=1", "api/v1/convert"),
    ],
)
async def test_the_fast_path_counts_its_requests_under_the_routes_labels(
    rated: dict[str, Item], path: str, query: bytes, route: str
) -> None:
    path = path.format(id=rated["BTC-USD"].id)
    counter = HTTP_REQUESTS.labels("GET", route, "200")
    request_tally.flush()
    before = counter._value.get()
    await both(path, query)
    request_tally.flush()  # the fast path's count, added within TALLY_FLUSH_S otherwise
    assert counter._value.get() == before + 2


# --- behind a TLS proxy (KURS_TLS_PROXY) ---------------------------------------------------
@pytest.fixture
def tls(settings: LazySettings, rated: dict[str, Item]) -> Iterator[DjangoCalls]:
    """The TLS proxy settings, and a Django handler whose SecurityMiddleware was built with them
    (the process's was built once, before any override)."""
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$", r"^metrics$"]
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    with counting(ASGIHandler()) as calls:
        yield calls


TLS_PATHS = [
    (COURSES, b"direction=btc-usd&x=%3C%3E|^"),
    ("/api/v1/items/{id}", b""),
    ("/api/v1/rates/BTC/USD", b"a=1"),
    ("/api/v1/convert", b"from=BTC&to=USD&amount=1"),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("path", "query"), TLS_PATHS)
@pytest.mark.parametrize(
    ("proto", "status"), [(None, 301), (b"http", 301), (b"https", 200), (b"https, http", 200)]
)
async def test_behind_a_tls_proxy_the_fast_path_redirects_and_sends_hsts_as_django_does(
    rated: dict[str, Item],
    tls: DjangoCalls,
    path: str,
    query: bytes,
    proto: bytes | None,
    status: int,
) -> None:
    path = path.format(id=rated["BTC-USD"].id)
    headers = [] if proto is None else [(b"x-forwarded-proto", proto)]
    fast, slow = await both(path, query, headers)
    assert tls.count == 1  # the fast path answered the first itself
    assert fast == slow
    assert fast.status == status
    if status == 301:
        location = f"https://127.0.0.1:8000{path}" + (f"?{query.decode()}" if query else "")
        assert fast.header(b"Location") == location.replace("|", "%7C").replace("^", "%5E").encode()
        assert fast.header(b"Strict-Transport-Security") is None
    else:
        assert fast.header(b"Strict-Transport-Security") == b"max-age=31536000; includeSubDomains"


# --- lifespan ------------------------------------------------------------------------------
async def test_the_lifespan_shutdown_closes_the_on_demand_http_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def bridge_lifespan(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    monkeypatch.setattr(asgi, "bridge_lifespan", bridge_lifespan)
    on_demand._upstream()  # this event loop's HTTP client, as the first on-demand lookup makes it
    client = on_demand._upstreams[asyncio.get_running_loop()].client
    messages: asyncio.Queue[Message] = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        messages.put_nowait({"type": kind})
    sent: list[Message] = []

    async def send(message: Message) -> None:
        assert not client.is_closed or message["type"] == "lifespan.shutdown.complete"
        sent.append(message)

    await asgi.lifespan({"type": "lifespan"}, messages.get, send)
    assert client.is_closed
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"text/plain")],
        [],
        [(b"content-type", b"application/json"), (b"content-type", b"application/json")],
    ],
    ids=["text/plain", "no content type", "two content types"],
)
async def test_post_convert_without_one_json_content_type_is_left_to_django(
    rated: dict[str, Item], headers: list[tuple[bytes, bytes]], django_calls: DjangoCalls
) -> None:
    body = BODY_CONVERSIONS[0]
    fast, slow = await both("/api/v1/convert", b"", headers, method="POST", body=body)
    assert fast == slow
    assert django_calls.count == 2
