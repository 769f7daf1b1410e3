"""The one ASGI layer every HTTP request goes through, around both entrances.

`EdgeLayer(django_app)` answers a request in this order:

1. its id (`X-Request-ID`, `edge.accesslog`), set for every log line of the request;
2. the `Host` against ALLOWED_HOSTS (`edge.hosts`): 400, JSON `{"detail"}` under `/api/`;
3. more query fields than DATA_UPLOAD_MAX_NUMBER_FIELDS: 400 (Django's limit, said once here
   instead of a traceback per request);
4. behind a TLS proxy (`KURS_TLS_PROXY`: SECURE_PROXY_SSL_HEADER, SECURE_SSL_REDIRECT,
   SECURE_REDIRECT_EXEMPT, SECURE_SSL_HOST): plain http gets a 301 to https;
5. the read throttle (KURS_RATE_LIMIT, per worker process, `edge.security`): 429 with
   `Retry-After`; the operations endpoints have a budget of their own;
6. under `/api/`: a body announced larger than DATA_UPLOAD_MAX_MEMORY_SIZE: 413; empty query
   values are dropped (`?since=&provider=` is no filter), for both entrances;
7. HEAD is answered as GET without the body, on every path;
8. the route table (`edge.routes`) answers the hot reads; anything else goes to Django.

Every answer, whoever gave it, then gets: `Cache-Control` by `edge.caching` when it has none,
X-Frame-Options, `X-Content-Type-Options: nosniff`, Referrer-Policy, Cross-Origin-Opener-Policy,
HSTS on secure requests (SECURE_HSTS_*), the CSP of the HTML pages (`edge.csp`), `X-Request-ID`;
under `/api/` an error Django answered in HTML (404, 405 with its `Allow`, 500, ...) becomes
JSON `{"detail"}`; then it is counted (`edge.metrics`, labelled with Django's URL pattern) and
logged (one access line). These are the settings Django's SecurityMiddleware and
XFrameOptionsMiddleware read; they are read once, when the layer is made (`reload()` reads them
again: tests that change them call it).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.urls import Resolver404, resolve
from django.utils.encoding import escape_uri_path, iri_to_uri

from config.logs import request_id as request_id_var
from edge import csp
from edge.accesslog import access_logger, log_access, request_id_for
from edge.answer import Answer, DownstreamApp, Message, Receive, Scope, Send, json_answer
from edge.caching import cache_control
from edge.clients import client_of, client_of_scope
from edge.errors import RETRY_HEADER, retry_after
from edge.hosts import AllowedHosts
from edge.metrics import RequestTally, request_tally
from edge.routes import ROUTES, Call, read_json_body
from edge.routes import answer as route_answer
from edge.security import ReadLimiter

Headers = list[tuple[bytes, bytes]]

# Django's names of the operations endpoints: a throttle budget of their own.
OPS_ROUTES = frozenset({"api-v1:health", "api-v1:openapi-json", "api-v1:openapi-view", "metrics"})
CONVERT = "api-v1:convert"  # POST /convert is a read
# Errors Django (not the API) may answer in HTML under /api/, and their JSON detail.
JSON_ERRORS = {
    400: "bad request",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
    500: "internal error",
}
MAX_RESOLVED = 4096
_RETRY = RETRY_HEADER.lower().encode()
logger = logging.getLogger(__name__)
_JSON = b"application/json; charset=utf-8"
_HTML = "text/html; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Resolution:
    label: str  # Django's URL pattern (`api/v1/items/<int:item_id>`), "unmatched" for none
    name: str | None  # Django's view name (`api-v1:get_item`)
    kwargs: dict[str, Any]


class Resolver:
    """`django.urls.resolve`, remembered per path (a resolution costs ~100 us: the admin's
    patterns come first)."""

    def __init__(self) -> None:
        self._known: dict[str, Resolution] = {}

    def __call__(self, path: str) -> Resolution:
        known = self._known.get(path)
        if known is None:
            try:
                match = resolve(path)
            except Resolver404:
                known = Resolution("unmatched", None, {})
            else:
                known = Resolution(match.route or "unmatched", match.view_name, match.kwargs)
            if len(self._known) >= MAX_RESOLVED:
                self._known.clear()
            self._known[path] = known
        return known

    def clear(self) -> None:
        self._known.clear()


@dataclass(slots=True)
class _Exchange:
    """One request's state across the layer."""

    method: str
    path: str
    query: bytes
    request_id: str
    secure: bool
    api: bool
    started: float
    status: int = 0
    rewrite: bytes | None = None  # the JSON body replacing Django's HTML error
    retry: bool = False  # Django's answer said the database failed: ask once more


class EdgeLayer:
    def __init__(
        self,
        app: DownstreamApp,
        *,
        limiter: ReadLimiter | None = None,
        tally: RequestTally | None = None,
    ) -> None:
        self.app = app
        self.fast = True  # tests switch the route table off to hear Django's answer
        self.limiter = limiter or ReadLimiter()
        self.tally = tally or request_tally
        self.resolve = Resolver()
        # Per secure (False, True): complete headers by answer (`_send`).
        self._prepared: tuple[dict[tuple[Any, ...], Headers], ...] = ({}, {})
        self.reload()

    # --- settings ---------------------------------------------------------------------------
    def reload(self) -> None:
        """Read the settings again (and forget what was derived from them)."""
        self.hosts = AllowedHosts(settings.ALLOWED_HOSTS, debug=settings.DEBUG)
        self.forwarded_host = settings.USE_X_FORWARDED_HOST
        self.proto_header: bytes | None = None
        self.proto_secure = b""
        # The setting's type, not the one django-stubs reads off config.settings (which sets it
        # only behind a TLS proxy, never to None).
        proxy: tuple[str, str] | None = settings.SECURE_PROXY_SSL_HEADER
        if proxy and proxy[0].startswith("HTTP_"):
            # The META name (HTTP_X_FORWARDED_PROTO) as the header's name (x-forwarded-proto).
            self.proto_header = proxy[0][5:].lower().replace("_", "-").encode("latin-1")
            self.proto_secure = proxy[1].encode("latin-1")
        self.redirect = settings.SECURE_SSL_REDIRECT
        self.redirect_host = settings.SECURE_SSL_HOST
        self.redirect_exempt = [re.compile(r) for r in settings.SECURE_REDIRECT_EXEMPT]
        self.hsts: tuple[bytes, bytes] | None = None
        if settings.SECURE_HSTS_SECONDS:
            value = f"max-age={settings.SECURE_HSTS_SECONDS}"
            if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
                value += "; includeSubDomains"
            if settings.SECURE_HSTS_PRELOAD:
                value += "; preload"
            self.hsts = (b"Strict-Transport-Security", value.encode())
        self.common = _common_headers()
        self.rate_limit: tuple[int, int] | None = settings.KURS_RATE_LIMIT
        self.num_proxies: int = settings.NINJA_NUM_PROXIES or 0
        self.max_fields: int | None = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        self.max_body: int | None = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        self.resolve.clear()
        self.limiter.clear()
        for prepared in self._prepared:
            prepared.clear()

    # --- a request --------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        host: bytes | None = None
        hosts = 0
        incoming = if_none_match = proto = forwarded_for = forwarded_host = length = None
        proto_header = self.proto_header
        # Several headers of one name are one comma-separated list, as Django joins them.
        # Django ignores names with `_` (`x_forwarded_proto`): so does this loop.
        for name, value in scope["headers"]:
            if name == b"host":
                hosts += 1
                host = value
            elif name == b"if-none-match":
                if_none_match = value if if_none_match is None else if_none_match + b"," + value
            elif name == b"x-request-id":
                incoming = value if incoming is None else incoming + b"," + value
            elif name == proto_header:
                proto = value if proto is None else proto + b"," + value
            elif name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b"," + value
            elif name == b"x-forwarded-host":
                forwarded_host = value
            elif name == b"content-length":
                length = value
        if proto is not None:
            secure = proto.split(b",", 1)[0].strip() == self.proto_secure
        else:
            secure = scope.get("scheme") == "https"
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        path_info = path[len(root) :] if root and path.startswith(root) else path
        exchange = _Exchange(
            method=scope["method"],
            path=path,
            query=scope["query_string"],
            request_id=request_id_for("" if incoming is None else incoming.decode("latin-1")),
            secure=secure,
            api=path_info.startswith("/api/"),
            started=started,
        )
        resolution = self.resolve(path_info)
        try:
            if self.forwarded_host and forwarded_host is not None:
                host, hosts = forwarded_host, 1
            elif host is None and hosts == 0:
                server = scope.get("server")
                host, hosts = (f"{server[0]}:{server[1]}".encode() if server else None), 1
            refusal = self._refusal(
                exchange,
                resolution,
                host if hosts == 1 else None,
                path_info,
                scope,
                length,
                forwarded_for,
            )
            if refusal is not None:
                await self._send(send, exchange, refusal)
                return
            await self._dispatch(scope, receive, send, exchange, resolution, if_none_match)
        finally:
            self._done(exchange, resolution, scope)

    def _refusal(
        self,
        exchange: _Exchange,
        resolution: Resolution,
        host: bytes | None,
        path_info: str,
        scope: Scope,
        length: bytes | None,
        forwarded_for: bytes | None,
    ) -> Answer | None:
        """What the edge answers itself, before either entrance, or None."""
        if host is None or not self.hosts.admits(host):
            return self._error(exchange, 400, "invalid Host header")
        query = exchange.query
        if query and self.max_fields is not None and query.count(b"&") >= self.max_fields:
            return self._error(
                exchange, 400, f"too many query parameters (at most {self.max_fields})"
            )
        if self.redirect and not exchange.secure and not self._exempt(path_info):
            return self._redirect(exchange, host)
        if self.rate_limit is not None:
            budget = _budget(resolution.name, exchange.method)
            if budget is not None:
                client = scope.get("client")
                who = client_of(
                    client[0] if client else None,
                    None if forwarded_for is None else forwarded_for.decode("latin-1"),
                    self.num_proxies,
                )
                wait = self.limiter.wait(budget, who, self.rate_limit)
                if wait is not None:
                    return json_answer(429, {"detail": "too many requests"}, (retry_after(wait),))
        if exchange.api and length is not None and self.max_body is not None:
            try:
                announced = int(length)
            except ValueError:
                return self._error(exchange, 400, "invalid Content-Length")
            if announced > self.max_body:
                detail = f"request body too large (at most {self.max_body} bytes)"
                return self._error(exchange, 413, detail)
        return None

    def _error(self, exchange: _Exchange, status: int, detail: str) -> Answer:
        if exchange.api:
            return json_answer(status, {"detail": detail})
        return Answer(status, f"<h1>{detail}</h1>".encode(), (("Content-Type", _HTML),))

    def _exempt(self, path_info: str) -> bool:
        relative = path_info.lstrip("/")
        return any(pattern.search(relative) for pattern in self.redirect_exempt)

    def _redirect(self, exchange: _Exchange, host: bytes) -> Answer:
        # As SecurityMiddleware: https://, SECURE_SSL_HOST or the request's host, the full path.
        query = exchange.query.decode("latin-1")
        full_path = escape_uri_path(exchange.path) + (f"?{iri_to_uri(query)}" if query else "")
        location = iri_to_uri(f"https://{self.redirect_host or host.decode('latin-1')}{full_path}")
        return Answer(301, b"", (("Content-Type", _HTML), ("Location", location)))

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: _Exchange,
        resolution: Resolution,
        if_none_match: bytes | None,
    ) -> None:
        method = "GET" if exchange.method == "HEAD" else exchange.method
        query = exchange.query
        if exchange.api and query:
            query = _without_empty_values(query)
        name = resolution.name
        route = ROUTES.get((name, method)) if self.fast and name is not None else None
        if route is not None and query.isascii() and not scope.get("root_path"):
            body = None
            if route.reads_body:
                body, receive = await read_json_body(scope, receive)
            if body is not None or not route.reads_body:
                tags = None if if_none_match is None else if_none_match.decode("latin-1")
                call = Call(resolution.kwargs, query.decode("ascii"), tags, body)
                if route.charges_client:
                    call.client = client_of_scope(scope)
                answer = await route_answer(route, call)
                if answer is not None:
                    await self._send(send, exchange, answer)
                    return
        if method != exchange.method or query is not exchange.query:
            scope = {**scope, "method": method, "query_string": query}
        # Django's log lines carry the id (the route table's answers log nothing but this line).
        token = request_id_var.set(exchange.request_id)
        try:
            if method != "GET":
                await self.app(scope, receive, self._wrapped(send, exchange, retry=False))
                return
            # A read whose database connection ended is answered again, once, on a new one
            # (Django opens a connection per request); its body, if any, is not read again.
            await self.app(scope, receive, self._wrapped(send, exchange, retry=True))
            if exchange.retry:
                logger.warning("%s %s: the database failed; reading again", method, exchange.path)
                exchange.retry = False
                await self.app(scope, _no_body(receive), self._wrapped(send, exchange, retry=False))
        finally:
            request_id_var.reset(token)

    # --- the answer -------------------------------------------------------------------------
    async def _send(self, send: Send, exchange: _Exchange, answer: Any) -> None:
        """An answer of the edge or of the route table, with what every answer gets."""
        status = answer.status
        exchange.status = status
        # The complete headers but the request id, prepared once per kind of answer: the same
        # headers, status and length to the same method and path, on the same kind of channel.
        key = (answer.headers, status, len(answer.body), exchange.method, exchange.path)
        prepared = self._prepared[exchange.secure].get(key)
        if prepared is None:
            prepared = [
                (n.encode("latin-1"), v.encode("latin-1"))
                for n, v in answer.headers
                if n != RETRY_HEADER
            ]
            present = {name.lower() for name, _ in prepared}
            if status != 304:  # RFC 9110 8.6: a 304 repeats no length but the 200's
                prepared.append((b"Content-Length", str(len(answer.body)).encode()))
            self._complete(prepared, exchange, present)
            known = self._prepared[exchange.secure]
            if len(known) >= MAX_RESOLVED:
                known.clear()
            known[key] = prepared
        headers = [*prepared, (b"X-Request-ID", exchange.request_id.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        body = b"" if exchange.method == "HEAD" else answer.body
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _wrapped(self, send: Send, exchange: _Exchange, *, retry: bool) -> Send:
        """Django's answer, with what every answer gets (held back when `retry` and the answer
        says the database failed: `_dispatch` asks again)."""

        async def wrapped(message: Message) -> None:
            kind = message["type"]
            if exchange.retry:
                return  # the failed attempt's answer: dropped
            if kind == "http.response.start":
                status = message["status"]
                headers: Headers = list(message.get("headers", ()))
                if any(name.lower() == _RETRY for name, _ in headers):
                    if retry:
                        exchange.retry = True
                        return
                    headers = [(n, v) for n, v in headers if n.lower() != _RETRY]
                exchange.status = status
                present = {name.lower() for name, _ in headers}
                if exchange.api and status in JSON_ERRORS and not _is_json(headers):
                    exchange.rewrite = json_answer(status, {"detail": JSON_ERRORS[status]}).body
                    headers = [
                        (name, value)
                        for name, value in headers
                        if name.lower() not in (b"content-type", b"content-length")
                    ]
                    headers.append((b"Content-Type", _JSON))
                    headers.append((b"Content-Length", str(len(exchange.rewrite)).encode()))
                self._complete(headers, exchange, present)
                headers.append((b"X-Request-ID", exchange.request_id.encode()))
                message = {**message, "headers": headers}
            elif kind == "http.response.body":
                if exchange.rewrite is not None:
                    if message.get("more_body", False):
                        return
                    body = b"" if exchange.method == "HEAD" else exchange.rewrite
                    message = {"type": kind, "body": body, "more_body": False}
                elif exchange.method == "HEAD" and message.get("body"):
                    message = {**message, "body": b""}
            await send(message)

        return wrapped

    def _complete(self, headers: Headers, exchange: _Exchange, present: set[bytes]) -> None:
        """Add what every answer gets (but its id), where the answer did not set it itself."""
        if b"cache-control" not in present:
            policy = cache_control(exchange.method, exchange.path, exchange.status)
            if policy is not None:
                headers.append((b"Cache-Control", policy.encode()))
        for name, lower, value in self.common:
            if lower not in present:
                headers.append((name, value))
        if (
            exchange.secure
            and self.hsts is not None
            and b"strict-transport-security" not in present
        ):
            headers.append(self.hsts)
        if csp.covered(exchange.path) and b"content-security-policy" not in present:
            headers.append((b"Content-Security-Policy", csp.POLICY.encode()))

    def _done(self, exchange: _Exchange, resolution: Resolution, scope: Scope) -> None:
        elapsed = time.perf_counter() - exchange.started
        status = exchange.status or 500  # the app raised before it answered
        self.tally.observe(exchange.method, resolution.label, status, elapsed)
        if not access_logger.isEnabledFor(logging.WARNING if status >= 500 else logging.INFO):
            return  # checked first: the line's arguments cost more than a whole fast answer
        query = exchange.query.decode("latin-1")
        client = scope.get("client")
        log_access(
            exchange.method,
            f"{exchange.path}?{query}" if query else exchange.path,
            exchange.path,
            status,
            elapsed * 1000,
            client[0] if client else None,
            exchange.request_id,
        )


def _budget(name: str | None, method: str) -> str | None:
    """The throttle budget a request counts against: reads, operations, or none (writes)."""
    if name is None:
        return None
    if name in OPS_ROUTES:
        return "ops"
    if name.startswith("api-v1:") and (method in ("GET", "HEAD") or name == CONVERT):
        return "read"
    return None


def _without_empty_values(query: bytes) -> bytes:
    """The query without its empty values (`a=&b=1` -> `b=1`): under /api/ they mean absent."""
    parts = query.split(b"&")
    kept = [part for part in parts if part.partition(b"=")[2]]
    return query if len(kept) == len(parts) else b"&".join(kept)


def _no_body(receive: Receive) -> Receive:
    """An empty request body, then what the client sends (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    return replay


def _is_json(headers: Headers) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.startswith(b"application/json")
    return False


def _common_headers() -> list[tuple[bytes, bytes, bytes]]:
    """(name, its lower case, value) of the headers every answer gets, from the settings
    Django's SecurityMiddleware and XFrameOptionsMiddleware read."""
    headers: list[tuple[str, str]] = []
    if settings.X_FRAME_OPTIONS:
        headers.append(("X-Frame-Options", settings.X_FRAME_OPTIONS.upper()))
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append(("X-Content-Type-Options", "nosniff"))
    # Django takes a string or a list of policies (django-stubs says only str).
    policy: str | Iterable[str] = settings.SECURE_REFERRER_POLICY
    if policy:
        value = (
            ",".join(v.strip() for v in policy.split(","))
            if isinstance(policy, str)
            else ",".join(policy)
        )
        headers.append(("Referrer-Policy", value))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append(("Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY))
    return [(n.encode(), n.lower().encode(), v.encode("latin-1")) for n, v in headers]
