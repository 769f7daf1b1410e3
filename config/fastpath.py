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
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from config.metrics import HTTP_LATENCY, HTTP_REQUESTS
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


def _security_headers() -> list[tuple[bytes, bytes]]:
    """What SecurityMiddleware adds to every response (after CommonMiddleware's length)."""
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
    return headers


class CoursesFastPath:
    """ASGI middleware: serve `/courses` from `cache`, pass everything else to `app`."""

    def __init__(self, app: ASGIApp, *, cache: CoursesCache, snapshot: RatesSnapshot) -> None:
        self.app = app
        self.cache = cache
        self.snapshot = snapshot
        self.enabled = True  # tests switch it off to hear Django's answer to the same request
        self._known_hosts: set[bytes] = set()
        self._outer: list[tuple[bytes, bytes]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and self._serves(scope):
            await self._answer(scope, send)
            return
        await self.app(scope, receive, send)

    def _serves(self, scope: Scope) -> bool:
        query = scope.get("query_string", b"")
        return (
            self.enabled
            and scope["method"] == "GET"
            and not scope.get("root_path")
            and settings.KURS_RATE_LIMIT is None
            and self.snapshot.loaded
            and len(query) <= MAX_QUERY_BYTES
            and query.isascii()
            and not (scope.get("scheme") == "https" and settings.SECURE_HSTS_SECONDS)
            and self._host_allowed(scope)
        )

    def _host_allowed(self, scope: Scope) -> bool:
        if settings.USE_X_FORWARDED_HOST:
            return False
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
        directions: list[str] = []
        exchanger: str | None = None
        # As Django's QueryDict: blank values kept, `&` only, the last `exchanger` wins.
        for key, value in parse_qsl(scope.get("query_string", b"").decode("ascii"), True):
            if key == "direction":
                directions.append(value)
            elif key == "exchanger":
                exchanger = value
        if_none_match = [value for name, value in scope["headers"] if name == b"if-none-match"]
        answer = self.cache.answer(
            directions,
            exchanger,
            ",".join(value.decode("latin-1") for value in if_none_match) if if_none_match else None,
        )
        headers = self._headers(answer)
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})
        HTTP_REQUESTS.labels("GET", ROUTE, str(answer.status)).inc()
        HTTP_LATENCY.labels("GET", ROUTE).observe(time.perf_counter() - started)

    def _headers(self, answer: CoursesAnswer) -> list[tuple[bytes, bytes]]:
        # In the order Django's middleware stack adds them, innermost first.
        if self._outer is None:
            self._outer = _security_headers()
        headers = [(name.encode(), value.encode("latin-1")) for name, value in answer.headers]
        if settings.X_FRAME_OPTIONS:
            headers.append((b"X-Frame-Options", settings.X_FRAME_OPTIONS.upper().encode()))
        headers.append((b"Content-Length", str(len(answer.body)).encode()))
        headers.extend(self._outer)
        return headers
