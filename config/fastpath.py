"""`GET /api/v1/courses` answered before Django: the hottest read at the speed of raw ASGI.

Django's async request path tops out near 600-1,000 req/s on two cores; `/courses` is a lookup
of a body precomputed from the in-process snapshot (`rates.courses.courses_cache`), so this
layer sends that body itself, with the headers Django's middleware would have added, and the
ninja route (`rates.api.list_courses`, the documented definition) stays byte-identical: both ask
the same cache, and `config/tests/test_fastpath.py` compares them for many requests.

Anything unusual falls through to Django, which then answers exactly as documented:
- `KURS_RATE_LIMIT` is set (the per-client throttle counts in the shared cache: a round trip
  this layer exists to avoid; with a limit configured, `/courses` is served by Django);
- the snapshot is not loaded yet (the route loads it);
- a method other than GET, a `root_path`, a non-ASCII or very long query string, a Host header
  that ALLOWED_HOSTS does not admit (Django answers 400), or a secure request under HSTS.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.test.signals import setting_changed

from config.metrics import HTTP_LATENCY, HTTP_REQUESTS
from config.middleware import log_access, request_id_for
from rates.courses import CoursesAnswer, CoursesCache
from rates.snapshot import RatesSnapshot

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/api/v1/courses"
# The metric labels Django's resolver gives the ninja route (config.metrics._route).
ROUTE = "api/v1/courses"
MAX_QUERY_BYTES = 4096
MAX_KNOWN_HOSTS = 64
MAX_MEMO = 1024


@dataclass(frozen=True, slots=True)
class _Memo:
    built: Any  # rates.courses._Built, or None for an error
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _outer_headers() -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """What Django's middleware adds around the view's headers: before and after the length.

    XFrameOptionsMiddleware (innermost) adds its header first; CommonMiddleware the length;
    SecurityMiddleware (outermost) the rest.
    """
    inner = []
    if settings.X_FRAME_OPTIONS:
        inner.append((b"X-Frame-Options", settings.X_FRAME_OPTIONS.upper().encode()))
    headers = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"X-Content-Type-Options", b"nosniff"))
    policy = settings.SECURE_REFERRER_POLICY
    if policy:
        value = policy if isinstance(policy, str) else ",".join(policy)
        headers.append((b"Referrer-Policy", value.encode("latin-1")))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        coop = settings.SECURE_CROSS_ORIGIN_OPENER_POLICY
        headers.append((b"Cross-Origin-Opener-Policy", coop.encode("latin-1")))
    return inner, headers


class CoursesFastPath:
    """ASGI middleware: serve `/courses` from `cache`, pass everything else to `app`.

    Per request it does a few dict lookups: the ASGI messages of an answer are memoised per
    (query string, If-None-Match) for as long as the cache says that answer stands, and the
    settings it depends on are read once (again when a test overrides one).
    """

    def __init__(self, app: ASGIApp, *, cache: CoursesCache, snapshot: RatesSnapshot) -> None:
        self.app = app
        self.cache = cache
        self.snapshot = snapshot
        self.enabled = True  # tests switch it off to hear Django's answer to the same request
        self._known_hosts: set[bytes] = set()
        self._memo: dict[tuple[bytes, bytes | None], _Memo] = {}
        self._requests = {
            status: HTTP_REQUESTS.labels("GET", ROUTE, str(status)) for status in (200, 304, 422)
        }
        self._latency = HTTP_LATENCY.labels("GET", ROUTE)
        self._read_settings()
        setting_changed.connect(self._on_setting_changed, weak=False)

    def _read_settings(self) -> None:
        # Behind a TLS proxy, whether a request is secure (redirect, HSTS) is SecurityMiddleware's
        # call from X-Forwarded-Proto: Django answers those requests.
        self._open = (
            settings.KURS_RATE_LIMIT is None
            and not settings.USE_X_FORWARDED_HOST
            and not settings.SECURE_SSL_REDIRECT
            and settings.SECURE_PROXY_SSL_HEADER is None
        )
        self._hsts = bool(settings.SECURE_HSTS_SECONDS)
        self._outer = _outer_headers()
        self._known_hosts.clear()
        self._memo.clear()

    def _on_setting_changed(self, **kwargs: Any) -> None:
        self._read_settings()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and self._serves(scope):
            await self._answer(scope, send)
            return
        await self.app(scope, receive, send)

    def _serves(self, scope: Scope) -> bool:
        query = scope["query_string"]
        return (
            self.enabled
            and self._open
            and scope["method"] == "GET"
            and self.snapshot.loaded
            and not scope.get("root_path")
            and len(query) <= MAX_QUERY_BYTES
            and query.isascii()
            and not (self._hsts and scope.get("scheme") == "https")
            and self._host_allowed(scope)
        )

    def _host_allowed(self, scope: Scope) -> bool:
        host = next((value for name, value in scope["headers"] if name == b"host"), None)
        if host is None:
            return False
        if host in self._known_hosts:
            return True
        domain, _port = split_domain_port(host.decode("latin-1"))
        allowed = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not allowed:
            allowed = [".localhost", "127.0.0.1", "[::1]"]  # as HttpRequest.get_host does
        if not domain or not validate_host(domain, allowed):
            return False
        if len(self._known_hosts) < MAX_KNOWN_HOSTS:
            self._known_hosts.add(host)
        return True

    async def _answer(self, scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        if_none_match: bytes | None = None
        incoming_id = ""
        for name, value in scope["headers"]:
            if name == b"if-none-match":  # several headers are one list, as Django joins them
                if_none_match = value if if_none_match is None else if_none_match + b"," + value
            elif name == b"x-request-id":
                incoming_id = value.decode("latin-1")
        key = (scope["query_string"], if_none_match)
        memo = self._memo.get(key)
        if memo is None or not self.cache.is_current(memo.built):
            memo = self._compute(key)
        # As RequestContextMiddleware does on the Django path: the id, then one access line.
        rid = request_id_for(incoming_id)
        headers = [*memo.headers, (b"X-Request-ID", rid.encode())]
        await send({"type": "http.response.start", "status": memo.status, "headers": headers})
        await send({"type": "http.response.body", "body": memo.body, "more_body": False})
        elapsed = time.perf_counter() - started
        self._requests[memo.status].inc()
        self._latency.observe(elapsed)
        query = scope["query_string"].decode("ascii")
        client = scope.get("client")
        log_access(
            "GET",
            f"{PATH}?{query}" if query else PATH,
            PATH,
            memo.status,
            elapsed * 1000,
            client[0] if client else None,
        )

    def _compute(self, key: tuple[bytes, bytes | None]) -> _Memo:
        query, if_none_match = key
        directions: list[str] = []
        exchanger: str | None = None
        # As Django's QueryDict: blank values kept, `&` only, the last `exchanger` wins.
        for name, value in parse_qsl(query.decode("ascii"), keep_blank_values=True):
            if name == "direction":
                directions.append(value)
            elif name == "exchanger":
                exchanger = value
        tags = None if if_none_match is None else if_none_match.decode("latin-1")
        answer = self.cache.answer(directions, exchanger, tags)
        memo = _Memo(answer.built, answer.status, self._headers(answer), answer.body)
        if answer.built is not None:  # errors echo their input: not worth keeping
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            self._memo[key] = memo
        return memo

    def _headers(self, answer: CoursesAnswer) -> list[tuple[bytes, bytes]]:
        # In the order Django's middleware stack adds them, innermost first.
        headers = [(name.encode(), value.encode("latin-1")) for name, value in answer.headers]
        headers.extend(self._outer[0])
        headers.append((b"Content-Length", str(len(answer.body)).encode()))
        headers.extend(self._outer[1])
        return headers
