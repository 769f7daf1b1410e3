"""The `/courses` fast path answers exactly what the ninja route answers, byte for byte."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import LazySettings

from config.asgi import http_app
from config.metrics import HTTP_REQUESTS
from items.models import Item
from rates.courses import courses_cache
from rates.models import CurrentRate
from rates.snapshot import snapshot

Message = dict[str, Any]
REQUEST_ID = b"fastpath-test-0001"


async def call(
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: str = "GET",
    host: bytes = b"127.0.0.1:8000",
) -> list[Message]:
    """One request through the project's HTTP app; the ASGI messages it sends back."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/api/v1/courses",
        "raw_path": b"/api/v1/courses",
        "query_string": query,
        "root_path": "",
        # A fixed request id: both doors echo it, so their headers can be compared exactly.
        "headers": [(b"host", host), (b"x-request-id", REQUEST_ID), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending = [{"type": "http.request", "body": b"", "more_body": False}]
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
    return sent


class DjangoCalls:
    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def django_calls() -> Iterator[DjangoCalls]:
    """Counts the requests the fast path passed on to Django."""
    calls = DjangoCalls()
    django_app = http_app.app

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        calls.count += 1
        await django_app(scope, receive, send)

    http_app.app = counting
    try:
        yield calls
    finally:
        http_app.app = django_app


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


async def both(query: bytes, headers: list[tuple[bytes, bytes]] | None = None, **kw: Any) -> Any:
    http_app.enabled = True
    fast = await call(query, headers, **kw)
    http_app.enabled = False
    try:
        slow = await call(query, headers, **kw)
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


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
@pytest.mark.parametrize("query", QUERIES, ids=[q.decode()[:40] or "(none)" for q in QUERIES])
async def test_both_paths_answer_identical_status_headers_and_bytes(
    query: bytes, django_calls: DjangoCalls
) -> None:
    fast, slow = await both(query)
    assert django_calls.count == 1  # only the second call went through Django
    assert fast == slow
    assert fast[0]["status"] in (200, 422)


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_both_paths_answer_the_same_304_to_the_current_etag(
    django_calls: DjangoCalls,
) -> None:
    [start, _] = await call()
    etag = dict(start["headers"])[b"ETag"]
    for header in (etag, b'"other", W/' + etag, b"*"):
        fast, slow = await both(b"", [(b"if-none-match", header)])
        assert fast == slow
        assert fast[0]["status"] == 304
        assert fast[1]["body"] == b""
        assert dict(fast[0]["headers"])[b"ETag"] == etag
    fast, slow = await both(b"", [(b"if-none-match", b'"stale-etag"')])
    assert fast == slow
    assert fast[0]["status"] == 200
    # Another filter has its own body and ETag: the first one's does not answer 304 there.
    fast, slow = await both(b"direction=BTC-USD", [(b"if-none-match", etag)])
    assert fast == slow
    assert fast[0]["status"] == 200


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_answer_is_the_seed_format_with_mixed_and_stale() -> None:
    [start, body] = await call()
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"Cache-Control"] == b"max-age=1"
    assert headers[b"Content-Length"] == str(len(body["body"])).encode()
    assert json.loads(body["body"], parse_float=Decimal) == {
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
@pytest.mark.parametrize(
    ("method", "host"),
    [("HEAD", b"127.0.0.1:8000"), ("POST", b"127.0.0.1:8000"), ("GET", b"evil.example")],
)
async def test_what_the_fast_path_does_not_serve_goes_to_django_unchanged(
    method: str, host: bytes, django_calls: DjangoCalls
) -> None:
    fast, slow = await both(b"", method=method, host=host)
    assert django_calls.count == 2
    assert fast == slow
    assert fast[0]["status"] in (400, 405)


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_with_a_rate_limit_courses_are_served_and_limited_by_django(
    settings: LazySettings, django_calls: DjangoCalls
) -> None:
    settings.KURS_RATE_LIMIT = (2, 60)
    statuses = [(await call(host=b"localhost"))[0]["status"] for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert django_calls.count == 3


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_fast_path_counts_its_requests_in_the_http_metrics() -> None:
    counter = HTTP_REQUESTS.labels("GET", "api/v1/courses", "200")
    before = counter._value.get()
    http_app.enabled = False
    await call()  # through Django: the label the route gets there
    http_app.enabled = True
    await call()
    assert counter._value.get() == before + 2


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
        [start, body] = await call()
        assert django_calls.count == 1
        assert start["status"] == 200
        assert json.loads(body["body"])["courses"] == [{"direction": "BTC-USD", "value": 54000.5}]
        await call()
        assert django_calls.count == 1  # loaded now: the fast path serves
    finally:
        snapshot.reset()
        courses_cache.clear()


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_fast_path_never_answers_from_a_memo_the_snapshot_has_moved_past() -> None:
    query = b"direction=BTC-USD"
    [start, body] = await call(query)
    etag = dict(start["headers"])[b"ETag"]
    assert (await call(query, [(b"if-none-match", etag)]))[0]["status"] == 304
    put("BTC-USD", "54001.5", "bybit")
    fast, slow = await both(query, [(b"if-none-match", etag)])
    assert fast == slow
    assert fast[0]["status"] == 200
    assert json.loads(fast[1]["body"]) == {
        "exchanger": "bybit",
        "courses": [{"direction": "BTC-USD", "value": 54001.5}],
    }
    assert body["body"] != fast[1]["body"]


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_the_fast_path_gives_a_request_id_and_logs_one_access_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="kurs.access")
    start, _ = await call(b"direction=BTC-USD")
    assert dict(start["headers"])[b"X-Request-ID"] == REQUEST_ID
    [line] = [record for record in caplog.records if record.name == "kurs.access"]
    assert line.getMessage().startswith("GET /api/v1/courses?direction=BTC-USD 200 ")


@pytest.mark.django_db
@pytest.mark.usefixtures("courses")
async def test_behind_a_tls_proxy_django_answers_every_courses_request(
    settings: LazySettings, django_calls: DjangoCalls
) -> None:
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    # SecurityMiddleware (built once per process, before this override) makes the redirect and
    # the HSTS header from X-Forwarded-Proto: what matters here is that it, not the fast path,
    # sees every /courses request.
    await call(b"")
    assert django_calls.count == 1
    secure, _ = await call(b"", [(b"x-forwarded-proto", b"https")])
    assert django_calls.count == 2
    assert secure["status"] == 200
