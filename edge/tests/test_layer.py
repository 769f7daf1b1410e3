"""The edge layer (`edge.layer`): what every request gets, whichever entrance answers it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import LazySettings

from edge import hosts
from edge.accesslog import BufferedStreamHandler
from edge.tests.asgi import HOST, both, call, counting
from items.models import Item
from rates.snapshot import snapshot

pytestmark = pytest.mark.django_db(transaction=True)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """Every record logged anywhere (the access lines do not propagate: caught apart)."""
    handler = Records()
    loggers = [logging.getLogger(), logging.getLogger("kurs.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture
def item() -> Item:
    return Item.objects.get_or_create(base="BTC", quote="USD")[0]


# --- request id and the access log -----------------------------------------------------------
async def test_it_returns_a_generated_request_id_and_keeps_a_sane_incoming_one() -> None:
    generated = (await call("/api/v1/items")).header("X-Request-ID")
    assert generated is not None
    assert len(generated) == 32
    assert (await call("/api/v1/items")).header("X-Request-ID") != generated
    sane = b"7f0c2a9e-lb-1:abc"
    answer = await call("/api/v1/items", headers=[(b"x-request-id", sane)])
    assert answer.header("X-Request-ID") == sane


@pytest.mark.parametrize("bad", [b"short", b"a b c d e f g h", b"x" * 129, b"id\tFORGED LINE"])
async def test_it_replaces_an_insane_incoming_request_id(bad: bytes) -> None:
    returned = (await call("/api/v1/items", headers=[(b"x-request-id", bad)])).header(
        "X-Request-ID"
    )
    assert returned != bad
    assert returned is not None
    assert len(returned) == 32


@pytest.mark.parametrize("path", ["/api/v1/no-such-thing", "/api/v1/courses"])
async def test_each_request_logs_one_access_line_with_its_id(
    logged: list[logging.LogRecord], path: str
) -> None:
    snapshot.reset()
    answer = await call(path, b"x=1", [(b"x-request-id", b"trace-12345678")])
    lines = [record for record in logged if record.name == "kurs.access"]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith(f"GET {path}?x=1 {answer.status} ")
    # The record's `extra` fields exist only at run time.
    assert lines[0].request_id == "trace-12345678"  # type: ignore[attr-defined]
    assert lines[0].status == answer.status  # type: ignore[attr-defined]
    assert answer.header("X-Request-ID") == b"trace-12345678"


async def test_lines_logged_while_django_answers_carry_the_request_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from config.logs import RequestIdFilter
    from rates import fetch_control

    seen: list[str | None] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            RequestIdFilter().filter(record)  # as the handlers of LOGGING do
            seen.append(getattr(record, "request_id", None))

    def statuses() -> list[dict[str, Any]]:
        logging.getLogger("rates.api").warning("inside the view")
        return []

    monkeypatch.setattr(fetch_control, "provider_statuses", statuses)
    probe = Probe(level=logging.INFO)
    logging.getLogger("rates.api").addHandler(probe)
    try:
        answer = await call("/api/v1/providers", headers=[(b"x-request-id", b"trace-87654321")])
    finally:
        logging.getLogger("rates.api").removeHandler(probe)
    assert answer.status == 200
    assert seen == ["trace-87654321"]


def test_json_logs_carry_an_iso_8601_utc_ts_and_extra_fields() -> None:
    from datetime import UTC, datetime
    from logging.config import DictConfigurator

    from django.conf import settings

    formatter = DictConfigurator({}).configure_formatter(
        dict(settings.LOGGING["formatters"]["json"])
    )
    record = logging.LogRecord("rates.fetcher", logging.WARNING, __file__, 1, "down", None, None)
    record.created = datetime(2026, 11, 30, 18, 24, 36, 657000, tzinfo=UTC).timestamp()
    record.provider = "binance"
    record.color_message = "\x1b[36mdown\x1b[0m"  # what uvicorn adds to its records
    line = json.loads(formatter.format(record))
    assert line["ts"] == "2026-11-30T18:24:36.657Z"
    assert line["level"] == "WARNING"
    assert line["provider"] == "binance"
    assert "color_message" not in line


@pytest.fixture
def counted_writes() -> tuple[io.StringIO, list[str]]:
    """A text stream, and each write it gets (counted by replacing its method)."""
    stream = io.StringIO()
    writes: list[str] = []
    original = stream.write

    def counted(text: str) -> int:
        writes.append(text)
        return original(text)

    stream.write = counted  # type: ignore[method-assign]
    return stream, writes


def test_the_access_handler_writes_its_lines_together(
    counted_writes: tuple[io.StringIO, list[str]],
) -> None:
    stream, writes = counted_writes
    handler = BufferedStreamHandler(stream, capacity=3, flush_s=3600)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for n in range(4):
        handler.handle(logging.makeLogRecord({"msg": f"line {n}"}))
    assert writes == ["line 0\nline 1\nline 2\n"]  # the capacity: one write of three lines
    handler.flush()  # what the flusher does every FLUSH_S, and exit does
    assert writes == ["line 0\nline 1\nline 2\n", "line 3\n"]
    handler.flush()
    assert len(writes) == 2  # nothing waiting, nothing written


def test_the_access_handler_formats_as_the_configured_formatter() -> None:
    from config.logs import ConsoleFormatter

    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, capacity=1)
    formatter = ConsoleFormatter("%(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    record = logging.makeLogRecord(
        {"name": "kurs.access", "levelname": "INFO", "msg": "GET / 200", "request_id": "r" * 8}
    )
    handler.handle(record)
    assert stream.getvalue() == formatter.format(record) + "\n"
    assert stream.getvalue().endswith("[request_id=rrrrrrrr]\n")


@pytest.mark.parametrize("kind", ["console", "json"])
def test_an_access_record_formats_as_a_logged_one(kind: str) -> None:
    from logging.config import DictConfigurator

    from django.conf import settings

    from edge.accesslog import AccessRecord

    formatter = DictConfigurator({}).configure_formatter(dict(settings.LOGGING["formatters"][kind]))
    fields = {"method": "GET", "path": "/x", "status": 200, "client": "1.2.3.4"}
    args = ("GET", "/x?a=1", 200, 1.25)
    cheap = AccessRecord(logging.INFO, "%s %s %d %.1fms", args, {**fields, "request_id": "r" * 8})
    full = logging.getLogger("kurs.access").makeRecord(
        "kurs.access", logging.INFO, "x.py", 1, "%s %s %d %.1fms", args, None, extra=fields
    )
    full.request_id = "r" * 8
    full.created, full.msecs = cheap.created, cheap.msecs
    assert formatter.format(cheap) == formatter.format(full)


# --- hosts -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "patterns", "allowed"),
    [
        ("example.com", ["example.com"], True),
        ("EXAMPLE.com:8000", ["example.com"], True),
        ("example.com.", ["example.com"], True),
        ("www.example.com", [".example.com"], True),
        ("example.com", [".example.com"], True),
        ("badexample.com", [".example.com"], False),
        ("anything.org", ["*"], True),
        ("[::1]:8000", ["[::1]"], True),
        ("evil.example", ["example.com"], False),
        ("example.com@evil", ["*"], False),
        ("", ["*"], False),
        ("exa mple.com", ["*"], False),
    ],
)
def test_allowed_hosts_follow_django_s_documented_rules(
    host: str, patterns: list[str], allowed: bool
) -> None:
    assert hosts.AllowedHosts(patterns, debug=False).admits(host.encode()) is allowed


def test_debug_without_allowed_hosts_admits_localhost_only() -> None:
    debug = hosts.AllowedHosts([], debug=True)
    assert debug.admits(b"localhost:8000")
    assert debug.admits(b"127.0.0.1")
    assert not debug.admits(b"example.com")
    assert not hosts.AllowedHosts([], debug=False).admits(b"localhost")


@pytest.mark.parametrize(
    ("host", "extra"),
    [(b"evil.example", []), (HOST, [(b"host", b"localhost")]), (b"bad host", [])],
    ids=["not allowed", "two Host headers", "malformed"],
)
async def test_a_bad_host_is_a_json_400_under_the_api_with_one_log_line(
    logged: list[logging.LogRecord], host: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    with counting() as django:
        answer = await call("/api/v1/items", headers=extra, host=host)
    assert django.count == 0
    assert answer.status == 400
    assert answer.json() == {"detail": "invalid Host header"}
    assert [record.name for record in logged] == ["kurs.access"]
    assert not any(record.exc_info for record in logged)
    page = await call("/", host=host, headers=extra)
    assert page.status == 400
    assert (page.header("Content-Type") or b"").startswith(b"text/html")


async def test_a_thousand_query_parameters_are_one_json_400(
    logged: list[logging.LogRecord],
) -> None:
    query = b"&".join(b"a%d=1" % n for n in range(1100))
    answer = await call("/api/v1/items", query)
    assert answer.status == 400
    assert answer.json() == {"detail": "too many query parameters (at most 1000)"}
    assert [record.name for record in logged] == ["kurs.access"]


# --- the /api/ rules ------------------------------------------------------------------------
@pytest.mark.parametrize("debug", [True, False])
@pytest.mark.parametrize("path", ["/api/v1/no-such-thing", "/api/v1/no-such-thing/", "/api/x"])
async def test_it_answers_json_404_for_unknown_api_paths_in_every_mode(
    settings: LazySettings, debug: bool, path: str
) -> None:
    settings.DEBUG = debug
    answer = await call(path)
    assert answer.status == 404
    assert answer.header("Content-Type") == b"application/json; charset=utf-8"
    assert answer.json() == {"detail": "not found"}
    assert answer.header("Content-Length") == str(len(answer.body)).encode()


async def test_it_keeps_the_api_s_own_404_detail_and_html_outside_the_api(
    settings: LazySettings,
) -> None:
    missing = await call("/api/v1/items/999999999")
    assert missing.status == 404
    assert missing.json() == {"detail": "item 999999999 not found"}
    settings.DEBUG = True
    page = await call("/no-such-page")
    assert page.status == 404
    assert (page.header("Content-Type") or b"").startswith(b"text/html")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/api/v1/items", "GET, POST"),
        ("DELETE", "/api/v1/items", "GET, POST"),
        ("POST", "/api/v1/health", "GET"),
        ("TRACE", "/api/v1/providers", "GET"),
        ("PUT", "/api/v1/items/1", "GET, PATCH, DELETE"),
        ("PUT", "/api/v1/courses", "GET"),
    ],
)
async def test_a_method_not_allowed_under_the_api_is_json_with_allow(
    method: str, path: str, allowed: str
) -> None:
    answer = await call(path, method=method)
    assert answer.status == 405
    assert answer.header("Content-Type") == b"application/json; charset=utf-8"
    assert answer.json() == {"detail": "method not allowed"}
    assert set((answer.header("Allow") or b"").decode().split(", ")) == set(allowed.split(", "))


async def test_empty_query_parameters_are_absent_on_both_entrances(item: Item) -> None:
    path = f"/api/v1/items/{item.id}/rates"
    empty = await call(path, b"since=&until=&date=&provider=&limit=")
    assert empty.status == 200, empty.body
    assert empty.json() == (await call(path)).json()
    assert (await call("/api/v1/items", b"is_active=&limit=&offset=")).status == 200
    assert (await call("/api/v1/convert", b"from=BTC&to=RUB&amount=")).json()["errors"] == [
        {"field": "amount", "message": "Field required"}
    ]
    kept = await call(path, b"since=&until=yesterday")
    assert kept.status == 422
    assert [error["field"] for error in kept.json()["errors"]] == ["until"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/health",
        "/api/v1/items",
        "/api/v1/items/{id}",
        "/api/v1/items/{id}/rates",
        "/api/v1/items/{id}/rates/latest",
        "/api/v1/items/{id}/candles",
        "/api/v1/providers",
        "/api/v1/courses",
        "/metrics",
        "/",
    ],
)
async def test_head_answers_wherever_get_does_as_get_without_a_body(
    item: Item, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge import health

    async def quick() -> dict[str, Any]:
        return {"status": "ok"}

    monkeypatch.setattr(health, "CHECKS", {"database": quick})
    path = path.format(id=item.id)
    get, head = await call(path), await call(path, method="HEAD")
    assert head.status == get.status != 405
    assert head.body == b""
    assert head.header("Content-Type") == get.header("Content-Type")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/convert"), ("POST", "/api/v1/items"), ("PATCH", "/api/v1/items/{id}")],
)
@pytest.mark.parametrize("announced", [True, False], ids=["Content-Length", "no length"])
async def test_a_body_over_the_upload_limit_is_a_json_413(
    settings: LazySettings,
    logged: list[logging.LogRecord],
    item: Item,
    method: str,
    path: str,
    announced: bool,
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    settings.KURS_API_KEYS_REQUIRED = False  # the body is read once the key is checked
    body = json.dumps({"from": "BTC", "to": "USD", "amount": "1", "name": "x" * 2000}).encode()
    headers = [(b"content-type", b"application/json")]
    if announced:
        headers.append((b"content-length", str(len(body)).encode()))
    answer = await call(path.format(id=item.id), headers=headers, method=method, body=body)
    assert answer.status == 413
    assert answer.json()["detail"].startswith("request body too large")
    assert not any(record.exc_info for record in logged)


# --- security headers, TLS --------------------------------------------------------------------
COMMON = {
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
    b"cross-origin-opener-policy": b"same-origin",
}


@pytest.mark.parametrize(
    "path", ["/api/v1/items", "/api/v1/courses", "/api/v1/nothing", "/", "/metrics"]
)
async def test_every_answer_has_the_security_headers(path: str) -> None:
    answer = await call(path)
    assert {name: answer.header(name) for name in COMMON} == COMMON
    assert answer.header("Strict-Transport-Security") is None  # plain http


@pytest.fixture
def tls(settings: LazySettings) -> None:
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$", r"^metrics$"]
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True


@pytest.mark.usefixtures("tls")
@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/api/v1/courses", b"direction=btc-usd&x=%3C%3E|^"),
        ("/api/v1/items/1", b""),
        ("/api/v1/items", b"a=1"),
        ("/", b""),
    ],
)
@pytest.mark.parametrize(
    ("proto", "status"), [(None, 301), (b"http", 301), (b"https", 200), (b"https, http", 200)]
)
async def test_behind_a_tls_proxy_plain_http_is_redirected_and_https_gets_hsts(
    path: str, query: bytes, proto: bytes | None, status: int
) -> None:
    headers = [] if proto is None else [(b"x-forwarded-proto", proto)]
    fast, slow = await both(path, query, headers)
    assert fast.comparable() == slow.comparable()
    if status == 301:
        assert fast.status == 301
        location = f"https://127.0.0.1:8000{path}" + (f"?{query.decode()}" if query else "")
        assert fast.header("Location") == location.replace("|", "%7C").replace("^", "%5E").encode()
        assert fast.header("Strict-Transport-Security") is None
    else:
        assert fast.status != 301
        hsts = b"max-age=31536000; includeSubDomains"
        assert fast.header("Strict-Transport-Security") == hsts


@pytest.mark.usefixtures("tls")
async def test_probes_are_exempt_from_the_redirect() -> None:
    assert (await call("/metrics")).status == 200


# --- the database going away under a read ------------------------------------------------------
@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`rates.selectors.current_rate_get` (latest) loses its connection, as many times as the
    list says (one entry per failure left)."""
    from django.db import OperationalError

    from rates import selectors

    failures = [1]
    calls: list[int] = []
    original = selectors.current_rate_get

    async def current_rate_get(**kwargs: Any) -> Any:
        calls.append(1)
        if failures:
            failures.pop()
            raise OperationalError("terminating connection due to administrator command")
        return await original(**kwargs)

    monkeypatch.setattr(selectors, "current_rate_get", current_rate_get)
    return failures


async def test_a_read_whose_connection_ended_is_read_again(
    item: Item, failing: list[int], logged: list[logging.LogRecord]
) -> None:
    from asgiref.sync import sync_to_async

    from rates.tests.support import store_current

    await sync_to_async(store_current)(item, "binance", "54000.5")
    answer = await call(f"/api/v1/items/{item.id}/rates/latest")
    assert answer.status == 200, answer.body
    assert answer.json()["value"] == 54000.5
    assert answer.header("Kurs-Retry") is None
    assert not any(record.exc_info for record in logged)


async def test_a_read_that_fails_twice_is_a_json_503_with_retry_after(
    item: Item, failing: list[int]
) -> None:
    failing.extend([1, 1])
    answer = await call(f"/api/v1/items/{item.id}/rates/latest")
    assert answer.status == 503
    assert answer.json() == {"detail": "the database is unavailable; retry shortly"}
    assert answer.header("Retry-After") == b"1"
    assert answer.header("Kurs-Retry") is None
    assert answer.header("Cache-Control") == b"no-store"


def test_log_access_writes_through_the_loggers_handlers_in_batches(
    counted_writes: tuple[io.StringIO, list[str]],
) -> None:
    """One list for the buffered handlers; the lines as the console formatter makes them, in
    one write per batch; the handler's level; any other handler gets records as logged."""
    from logging.config import DictConfigurator

    from django.conf import settings

    from edge.accesslog import access_record, console_line, flush_access_log, log_access

    logger = logging.getLogger("kurs.access")
    saved, level = list(logger.handlers), logger.level
    stream, writes = counted_writes
    handler = BufferedStreamHandler(stream, capacity=2, flush_s=3600)
    handler.setFormatter(
        DictConfigurator({}).configure_formatter(dict(settings.LOGGING["formatters"]["console"]))
    )
    records = Records()
    try:
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        log_access("GET", "/a?x=1", "/a", 200, 1.26, "1.2.3.4", "r" * 8)
        assert writes == []  # waiting for the batch
        log_access("POST", "/b", "/b", 503, 2.5, None, "s" * 8)
        assert len(writes) == 1
        first, second = writes[0].splitlines()
        assert first.endswith(" INFO    kurs.access: GET /a?x=1 200 1.3ms [request_id=rrrrrrrr]")
        assert second.endswith(" WARNING kurs.access: POST /b 503 2.5ms [request_id=ssssssss]")
        entry = (1.5, logging.INFO, "GET", "/c", "/c", 200, 0.5, None, "t" * 8)
        assert console_line(entry) == handler.format(access_record(entry))

        handler.setLevel(logging.WARNING)
        log_access("GET", "/c", "/c", 200, 0.5, None, "t" * 8)
        log_access("GET", "/d", "/d", 500, 0.5, None, "u" * 8)
        assert writes[1].endswith(" WARNING kurs.access: GET /d 500 0.5ms [request_id=uuuuuuuu]\n")
        assert "/c" not in writes[1]

        logger.handlers[:] = [handler, records]  # not every handler buffered: logged as records
        log_access("GET", "/e", "/e", 500, 0.5, None, "v" * 8)
        assert [r.getMessage() for r in records.records] == ["GET /e 500 0.5ms"]
        flush_access_log()
        assert writes[2].endswith(" kurs.access: GET /e 500 0.5ms [request_id=vvvvvvvv]\n")
    finally:
        logger.handlers[:] = saved
        logger.setLevel(level)
        flush_access_log()


@pytest.mark.parametrize(("failures", "status"), [(1, 200), (2, 503)])
async def test_the_route_table_reads_again_once_too(
    item: Item, monkeypatch: pytest.MonkeyPatch, failures: int, status: int
) -> None:
    from django.db import OperationalError

    from rates import detail

    left = [failures]
    original = detail._read

    def read(item_id: int) -> Any:
        if left[0]:
            left[0] -= 1
            raise OperationalError("server closed the connection unexpectedly")
        return original(item_id)

    monkeypatch.setattr(detail, "_read", read)
    detail.item_details.invalidate()
    with counting() as django:
        answer = await call(f"/api/v1/items/{item.id}")
    assert django.count == 0
    assert answer.status == status
    if status == 503:
        assert answer.header("Retry-After") == b"1"
        assert answer.header("Kurs-Retry") is None
    else:
        assert answer.json()["code"] == "BTC-USD"


@pytest.mark.parametrize(
    "entry",
    [
        (
            1765000000.0004,
            logging.INFO,
            "GET",
            "/api/v1/courses",
            "/api/v1/courses",
            200,
            0.04,
            "1.2.3.4",
            "a" * 32,
        ),
        (
            1765000000.9996,
            logging.WARNING,
            "POST",
            "/x?q=%41&b=%s",
            "/x",
            503,
            1234.5678,
            None,
            "r" * 8,
        ),
        (
            59.5,
            logging.INFO,
            "HEAD",
            "/api/v1/items/1",
            "/api/v1/items/1",
            304,
            0.0,
            "::1",
            "req-1234",
        ),
    ],
)
def test_the_fast_console_line_is_the_configured_console_formatters(entry: Any) -> None:
    from logging.config import DictConfigurator

    from django.conf import settings

    from edge.accesslog import access_record, console_line

    console = DictConfigurator({}).configure_formatter(
        dict(settings.LOGGING["formatters"]["console"])
    )
    assert console_line(entry) == console.format(access_record(entry))
    handler = BufferedStreamHandler(io.StringIO(), capacity=1)
    handler.setFormatter(console)
    assert handler._console  # the fast line is used only because it is the same text
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    assert not handler._console


def test_entries_are_written_through_any_other_formatter_and_the_handlers_level() -> None:
    from edge.accesslog import access_record

    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, capacity=10)
    formatter = logging.Formatter("%(levelname)s %(message)s %(status)s")
    handler.setFormatter(formatter)
    handler.setLevel(logging.WARNING)
    info = (1.0, logging.INFO, "GET", "/a", "/a", 200, 1.0, None, "r" * 8)
    warning = (2.0, logging.WARNING, "GET", "/b", "/b", 500, 2.0, None, "r" * 8)
    handler.add(info)
    handler.add(warning)
    handler.flush()
    assert stream.getvalue() == formatter.format(access_record(warning)) + "\n"
    assert stream.getvalue() == "WARNING GET /b 500 2.0ms 500\n"


@pytest.mark.parametrize(("failures", "status"), [(1, 200), (2, 503)])
async def test_the_dashboard_page_reads_again_once_then_answers_503_not_500(
    item: Item, monkeypatch: pytest.MonkeyPatch, failures: int, status: int
) -> None:
    """Django's own views answer a database failure as the API does (edge.errors'
    DatabaseFailureMiddleware), so the edge reads the page again on a new connection."""
    from django.db import OperationalError

    from realtime import views

    left = [failures]
    original = views.item_list  # type: ignore[attr-defined]  # the name the view calls

    def item_list(**kwargs: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise OperationalError("terminating connection due to administrator command")
        return original(**kwargs)

    monkeypatch.setattr(views, "item_list", item_list)
    answer = await call("/")
    assert answer.status == status
    assert left == [0]
    assert answer.header("Kurs-Retry") is None
    if status == 503:
        assert answer.json() == {"detail": "the database is unavailable; retry shortly"}
        assert answer.header("Retry-After") == b"1"
    else:
        assert b"BTC-USD" in answer.body
