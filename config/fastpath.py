"""The hottest reads answered before Django, at the speed of raw ASGI.

Django's async request path tops out near 600-1,000 req/s on two cores. Profiled under wrk
(py-spy, item detail), it spends its time making and joining a thread per request for the ORM's
thread-sensitive context, hopping threads twice in each sync-only middleware (sessions, CSRF,
auth, messages, common, clickjacking) and opening and closing a database connection per request.
So this layer answers from memory what the documented ninja routes answer:

- `GET /api/v1/courses`: a body precomputed from the snapshot (`rates.courses.courses_cache`);
- `GET /api/v1/items/{id}`: the item and its current rate (`rates.detail.item_details`);
- `GET /api/v1/rates/{base}/{quote}` and `GET|POST /api/v1/convert`: `rates.ondemand`, as the
  routes call it (tracked pairs from the snapshot, others on demand with its cache). A POST's body
  (one `application/json` body of at most 4 KiB) is read here and parsed as the API parses
  bodies; when Django must answer after all, it receives the same body again.

Bodies go through the routes' own response schemas and encoder, with the headers Django's
middleware would add, so both doors give the same status, headers and bytes
(`config/tests/test_fastpath.py` compares them). HEAD is answered as GET without a body, on both
doors: a HEAD of these paths that this layer hands to Django goes to it as a GET whose body is
dropped (the routes declare GET only). Behind a TLS proxy (`KURS_TLS_PROXY`) it does what
SecurityMiddleware does: plain http gets the same 301 to https, https answers carry HSTS.

Anything unusual falls through to Django, which then answers exactly as documented:
- `KURS_RATE_LIMIT` is set (the per-client throttle counts in the shared cache: a round trip
  this layer exists to avoid; with a limit configured, Django serves and limits these routes);
- the snapshot is not loaded yet (the routes load it, or answer 503);
- a method other than GET or HEAD, a `root_path`, a non-ASCII or very long query string, a
  Host header that ALLOWED_HOSTS does not admit (Django answers 400), several Host headers,
  `USE_X_FORWARDED_HOST`;
- input this layer does not check itself, so that every 4xx is Django's: an unknown item or an
  id out of range, assets that are not plain codes, a convert query or body with other, repeated
  or invalid fields, a body that is not one small JSON object.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.test.signals import setting_changed
from django.utils import timezone
from django.utils.encoding import escape_uri_path, iri_to_uri
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from config.caching import cache_control
from config.jsonenc import dumps, loads
from config.metrics import request_tally
from config.middleware import access_logger, log_access, request_id_for
from rates import ondemand
from rates.courses import CoursesAnswer, CoursesCache
from rates.detail import ItemDetailCache, ItemEntry
from rates.exceptions import OnDemandBudgetExceeded, PairNotPriced, ProvidersUnavailable
from rates.providers import Pair
from rates.schemas import ConvertIn, ConvertOut, ConvertQuery, ItemDetailOut, PairRateOut
from rates.snapshot import RatesSnapshot

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COURSES = "/api/v1/courses"
CONVERT = "/api/v1/convert"
# The routes' paths as Django's URL patterns match them (`<int:item_id>`, `<base>/<quote>`) ...
ITEM_PATH_RE = re.compile(r"/api/v1/items/[0-9]+")
PAIR_PATH_RE = re.compile(r"/api/v1/rates/[^/]+/[^/]+")
# ... and the part of them this layer answers itself.
ITEM_RE = re.compile(r"/api/v1/items/([0-9]{1,19})")
PAIR_RE = re.compile(r"/api/v1/rates/([A-Za-z0-9]{2,12})/([A-Za-z0-9]{2,12})")
# The metric labels Django's resolver gives the ninja routes (config.metrics._route).
ROUTES = {
    COURSES: "api/v1/courses",
    "item": "api/v1/items/<int:item_id>",
    "pair": "api/v1/rates/<base>/<quote>",
    CONVERT: "api/v1/convert",
    "redirect": "unmatched",  # SecurityMiddleware answers before the URL is resolved
}
# Paths under which a write through this process may change an item (the API, the admin).
WRITE_PREFIXES = ("/api/v1/items", "/admin/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON = b"application/json; charset=utf-8"
MAX_QUERY_BYTES = 4096
MAX_BODY_BYTES = 4096  # a POST /convert body: three short fields
JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})
MAX_KNOWN_HOSTS = 64
MAX_MEMO = 1024
_MAX_ID = 2**63 - 1  # BigAutoField: a larger id cannot exist (items.selectors.item_get)
_CONVERT_PARAMS = ["amount", "from", "to"]

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class _Memo:
    built: Any  # rates.courses._Built, or None for an error
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: Headers  # everything but X-Request-ID
    body: bytes


@dataclass(slots=True)
class _Request:
    method: str  # GET or HEAD
    route: str  # a ROUTES key
    query: bytes
    if_none_match: bytes | None
    incoming_id: str
    secure: bool
    host: bytes
    body: Any = None  # POST /convert: the parsed JSON body
    client: str | None = None  # the peer's address: what on-demand pricing charges


class ReadFastPath:
    """ASGI middleware: answer the read routes from memory, pass everything else to `app`.

    The settings it depends on are read once (again when a test overrides one); `/courses`
    answers are memoised per (query string, If-None-Match, secure) for as long as the cache
    says they stand.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cache: CoursesCache,
        snapshot: RatesSnapshot,
        items: ItemDetailCache,
    ) -> None:
        self.app = app
        self.cache = cache
        self.snapshot = snapshot
        self.items = items
        self.enabled = True  # tests switch it off to hear Django's answer to the same request
        self._known_hosts: set[bytes] = set()
        self._memo: dict[tuple[bytes, bytes | None, bool], _Memo] = {}
        self._item_templates: dict[int, tuple[ItemEntry, dict[str, Any]]] = {}
        self._read_settings()
        setting_changed.connect(self._on_setting_changed, weak=False)

    # --- settings ---------------------------------------------------------------------------
    def _read_settings(self) -> None:
        self._open = settings.KURS_RATE_LIMIT is None and not settings.USE_X_FORWARDED_HOST
        self._proto_header: bytes | None = None
        self._proto_secure = b""
        proxy = settings.SECURE_PROXY_SSL_HEADER
        if proxy:
            header, secure_value = proxy  # Django raises ImproperlyConfigured on another shape
            if header.startswith("HTTP_"):
                # The META name (HTTP_X_FORWARDED_PROTO) as the header's name (x-forwarded-proto).
                self._proto_header = header[5:].lower().replace("_", "-").encode("latin-1")
                self._proto_secure = secure_value.encode("latin-1")
            else:
                self._open = False  # not a header: Django's call
        self._redirect = settings.SECURE_SSL_REDIRECT
        self._redirect_host = settings.SECURE_SSL_HOST
        self._redirect_exempt = [re.compile(r) for r in settings.SECURE_REDIRECT_EXEMPT]
        self._hsts: Headers = []
        if settings.SECURE_HSTS_SECONDS:
            value = f"max-age={settings.SECURE_HSTS_SECONDS}"
            if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
                value += "; includeSubDomains"
            if settings.SECURE_HSTS_PRELOAD:
                value += "; preload"
            self._hsts = [(b"Strict-Transport-Security", value.encode())]
        self._inner, self._outer = _middleware_headers()
        self._known_hosts.clear()
        self._memo.clear()

    def _on_setting_changed(self, **kwargs: Any) -> None:
        self._read_settings()

    # --- dispatch ---------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = _route_of(path)
        method = scope["method"]
        if route is not None and method in ("GET", "HEAD"):
            request = self._request(scope, route) if self.enabled else None
            if request is not None and await self._answer(scope, request, send):
                return
            if method == "HEAD":
                # The routes declare GET: Django answers HEAD as that GET, its body dropped.
                scope = {**scope, "method": "GET"}
                send = _without_body(send)
        elif route == CONVERT and method == "POST":
            request = self._request(scope, route) if self.enabled else None
            if request is not None:
                # The body is read here; if Django must answer after all, it reads it again.
                body, receive = await _read_body(scope, receive)
                request.body = body
                if body is not None and await self._answer(scope, request, send):
                    return
        elif method not in SAFE_METHODS and path.startswith(WRITE_PREFIXES):
            send = self._invalidating(send)
        await self.app(scope, receive, send)

    def _invalidating(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            # The write has committed when its answer starts: forget before the client hears.
            if message["type"] == "http.response.start":
                self.items.invalidate()
            await send(message)

        return wrapped

    def _request(self, scope: Scope, route: str) -> _Request | None:
        """The request's parts this layer needs, or None when Django must answer it."""
        query = scope["query_string"]
        if (
            not self._open
            or not self.snapshot.loaded
            or scope.get("root_path")
            or len(query) > MAX_QUERY_BYTES
            or not query.isascii()
        ):
            return None
        host: bytes | None = None
        if_none_match: bytes | None = None
        incoming_id: bytes | None = None
        proto: bytes | None = None
        proto_header = self._proto_header
        for name, value in scope["headers"]:
            if name == b"host":
                if host is not None:
                    return None  # Django joins them into one invalid host: 400
                host = value
            elif name == b"if-none-match":  # several headers are one list, as Django joins them
                if_none_match = value if if_none_match is None else if_none_match + b"," + value
            elif name == b"x-request-id":
                incoming_id = value if incoming_id is None else incoming_id + b"," + value
            elif name == proto_header:
                proto = value if proto is None else proto + b"," + value
            # Django ignores names with `_` (`x_forwarded_proto`): so does this loop.
        if host is None or not self._host_allowed(host):
            return None
        if proto is not None:
            secure = proto.split(b",", 1)[0].strip() == self._proto_secure
        else:
            secure = scope.get("scheme") == "https"
        return _Request(
            method=scope["method"],
            route=route,
            query=query,
            if_none_match=if_none_match,
            incoming_id="" if incoming_id is None else incoming_id.decode("latin-1"),
            secure=secure,
            host=host,
            client=scope["client"][0] if scope.get("client") else None,
        )

    def _host_allowed(self, host: bytes) -> bool:
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

    async def _answer(self, scope: Scope, request: _Request, send: Send) -> bool:
        """Send the answer and return True, or return False to leave the request to Django."""
        started = time.perf_counter()
        path = scope["path"]
        route = request.route
        answer: _Answer | _Memo | None
        try:
            if self._redirect and not request.secure and not self._exempt(path):
                answer = self._redirect_answer(path, request)
                route = "redirect"
            elif route == COURSES:
                answer = self._courses(request)
            elif route == "item":
                answer = await self._item(path, request)
            elif route == "pair":
                answer = await self._pair(path, request)
            else:
                answer = await self._convert(request)
        except Exception:
            # E.g. the database went away under an item read: Django answers as documented.
            logger.warning("fast path: %s left to Django", path, exc_info=True)
            return False
        if answer is None:
            return False
        rid = request_id_for(request.incoming_id)
        headers = [*answer.headers]
        # What RequestContextMiddleware adds last on Django's path: Cache-Control, the request id.
        policy = cache_control(request.method, path, answer.status)
        if policy is not None:
            headers.append((b"Cache-Control", policy.encode()))
        headers.append((b"X-Request-ID", rid.encode()))
        body = b"" if request.method == "HEAD" else answer.body
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        elapsed = time.perf_counter() - started
        request_tally.observe(request.method, ROUTES[route], answer.status, elapsed)
        # Checked first: building the line's arguments costs more than the rest of a /courses
        # answer here (2 of 5 us, measured in-process) when the level is off.
        if access_logger.isEnabledFor(logging.WARNING if answer.status >= 500 else logging.INFO):
            query = request.query.decode("ascii")
            client = scope.get("client")
            log_access(
                request.method,
                f"{path}?{query}" if query else path,
                path,
                answer.status,
                elapsed * 1000,
                client[0] if client else None,
            )
        return True

    # --- TLS: what SecurityMiddleware does ----------------------------------------------------
    def _exempt(self, path: str) -> bool:
        relative = path.lstrip("/")
        return any(pattern.search(relative) for pattern in self._redirect_exempt)

    def _redirect_answer(self, path: str, request: _Request) -> _Answer:
        host = self._redirect_host or request.host.decode("latin-1")
        query = request.query.decode("ascii")
        full_path = escape_uri_path(path) + (f"?{iri_to_uri(query)}" if query else "")
        location = f"https://{host}{full_path}"
        # HttpResponsePermanentRedirect; the middleware inside SecurityMiddleware never runs.
        headers = [
            (b"Content-Type", b"text/html; charset=utf-8"),
            (b"Location", iri_to_uri(location).encode("latin-1")),
            *self._outer,
        ]
        return _Answer(301, headers, b"")

    # --- the routes -----------------------------------------------------------------------------
    def _courses(self, request: _Request) -> _Memo:
        key = (request.query, request.if_none_match, request.secure)
        memo = self._memo.get(key)
        if memo is None or not self.cache.is_current(memo.built):
            memo = self._compute_courses(key)
        return memo

    def _compute_courses(self, key: tuple[bytes, bytes | None, bool]) -> _Memo:
        query, if_none_match, secure = key
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
        memo = _Memo(
            answer.built, answer.status, self._courses_headers(answer, secure), answer.body
        )
        if answer.built is not None:  # errors echo their input: not worth keeping
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            self._memo[key] = memo
        return memo

    def _courses_headers(self, answer: CoursesAnswer, secure: bool) -> Headers:
        view = [(name.encode(), value.encode("latin-1")) for name, value in answer.headers]
        # A 304 has no body and says no length (RFC 9110 8.6: only the 200's length may be sent).
        length = None if answer.status == 304 else len(answer.body)
        return self._headers(view, length, secure)

    def _headers(self, view: Headers, length: int | None, secure: bool) -> Headers:
        """In the order Django's middleware stack adds them, innermost first."""
        headers = [*view, *self._inner]
        if length is not None:
            headers.append((b"Content-Length", str(length).encode()))
        if secure:
            headers.extend(self._hsts)
        headers.extend(self._outer)
        return headers

    def _json(self, status: int, data: Any, request: _Request) -> _Answer:
        body = dumps(data).encode()
        return _Answer(
            status, self._headers([(b"Content-Type", JSON)], len(body), request.secure), body
        )

    def _render(
        self, schema: type[BaseModel], data: Any, request: _Request, **dump: Any
    ) -> _Answer:
        # What ninja does with a view's result: validate against the response schema, dump it,
        # and encode it with the API's renderer (config.api.DecimalJSONRenderer -> dumps).
        return self._json(200, schema.model_validate(data).model_dump(**dump), request)

    async def _item(self, path: str, request: _Request) -> _Answer | None:
        match = ITEM_RE.fullmatch(path)
        if match is None:
            return None
        item_id = int(match[1])
        if not 0 < item_id <= _MAX_ID:
            return None
        entry = await self.items.entry(item_id)
        if entry is None:
            return None  # Django's 404 (and a new item is read on its next request)
        data = entry.view(timezone.now())
        # Validated once per entry (a pydantic pass costs 100 us here): only `latest`'s age and
        # status change between requests, and validating those two changes neither.
        template = self._item_templates.get(item_id)
        if template is None or template[0] is not entry:
            dumped = ItemDetailOut.model_validate(data).model_dump()
            if len(self._item_templates) >= MAX_MEMO:
                self._item_templates.clear()
            self._item_templates[item_id] = (entry, dumped)
        elif data["latest"] is None:
            dumped = template[1]
        else:
            judged = {"age_s": data["latest"]["age_s"], "status": data["latest"]["status"]}
            dumped = {**template[1], "latest": {**template[1]["latest"], **judged}}
        return self._json(200, dumped, request)

    async def _pair(self, path: str, request: _Request) -> _Answer | None:
        match = PAIR_RE.fullmatch(path)
        if match is None:
            return None
        base, quote = match[1].upper(), match[2].upper()
        if base == quote:
            return None  # Django's 422
        return await self._priced(
            PairRateOut,
            lambda: ondemand.pair_rate(Pair(base, quote), client=request.client),
            request,
            by_alias=False,
        )

    async def _convert(self, request: _Request) -> _Answer | None:
        """GET (the query) or POST (the JSON body): the three fields, valid, or Django's 422."""
        schema: type[ConvertIn]
        if request.body is None:
            params = parse_qsl(request.query.decode("ascii"), keep_blank_values=True)
            fields: Any = dict(params)
            names = sorted(name for name, _ in params)  # a repeated name is Django's
            schema = ConvertQuery
        else:
            fields = request.body
            # ConvertIn forbids other keys: anything but the three is Django's 422.
            names = sorted(fields) if isinstance(fields, dict) else []
            schema = ConvertIn
        if names != _CONVERT_PARAMS:
            return None
        try:
            asked = schema.model_validate(fields)
        except PydanticValidationError:
            return None  # Django's 422, in the API's error shape
        return await self._priced(
            ConvertOut,
            lambda: ondemand.convert(
                source=asked.from_, target=asked.to, amount=asked.amount, client=request.client
            ),
            request,
            by_alias=True,
        )

    async def _priced(
        self,
        schema: type[BaseModel],
        call: Callable[[], Awaitable[dict[str, Any]]],
        request: _Request,
        *,
        by_alias: bool,
    ) -> _Answer:
        # The errors as config.api maps them: {"detail": ...}.
        try:
            data = await call()
        except PairNotPriced as exc:
            return self._json(404, {"detail": str(exc)}, request)
        except ProvidersUnavailable as exc:
            return self._json(503, {"detail": str(exc)}, request)
        except OnDemandBudgetExceeded as exc:
            body = dumps({"detail": str(exc)}).encode()
            wait = str(max(1, math.ceil(exc.retry_after))).encode()
            view = [(b"Content-Type", JSON), (b"Retry-After", wait)]
            return _Answer(429, self._headers(view, len(body), request.secure), body)
        return self._render(schema, data, request, by_alias=by_alias)


def _route_of(path: str) -> str | None:
    if path in (COURSES, CONVERT):
        return path
    if path.startswith("/api/v1/items/") and ITEM_PATH_RE.fullmatch(path):
        return "item"
    if path.startswith("/api/v1/rates/") and PAIR_PATH_RE.fullmatch(path):
        return "pair"
    return None


def _middleware_headers() -> tuple[Headers, Headers]:
    """What Django's middleware adds around the view's headers: before and after the length.

    XFrameOptionsMiddleware (innermost) adds its header first; CommonMiddleware the length;
    SecurityMiddleware (outermost) HSTS on secure requests, then the rest.
    """
    inner = []
    if settings.X_FRAME_OPTIONS:
        inner.append((b"X-Frame-Options", settings.X_FRAME_OPTIONS.upper().encode()))
    outer = []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        outer.append((b"X-Content-Type-Options", b"nosniff"))
    policy = settings.SECURE_REFERRER_POLICY
    if policy:
        value = (
            ",".join(v.strip() for v in policy.split(","))
            if isinstance(policy, str)
            else ",".join(policy)
        )
        outer.append((b"Referrer-Policy", value.encode("latin-1")))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        coop = settings.SECURE_CROSS_ORIGIN_OPENER_POLICY
        outer.append((b"Cross-Origin-Opener-Policy", coop.encode("latin-1")))
    return inner, outer


async def _read_body(scope: Scope, receive: Receive) -> tuple[Any, Receive]:
    """A small JSON body, parsed as the API parses bodies (exact decimals), or None; and a
    `receive` that hands Django the same messages again, then the client's own."""
    content_type = None
    for name, value in scope["headers"]:
        if name == b"content-type":  # several are Django's call
            content_type = b"" if content_type is not None else value.lower()
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # the client left: Django hears it
        size += len(message.get("body", b""))
        if size > MAX_BODY_BYTES or not message.get("more_body", False):
            break
    replay = _replaying(messages, receive)
    last = messages[-1]
    if (
        content_type not in JSON_TYPES
        or last["type"] != "http.request"
        or last.get("more_body", False)
        or size > MAX_BODY_BYTES
    ):
        return None, replay
    try:
        return loads(b"".join(m.get("body", b"") for m in messages)), replay
    except (ValueError, RecursionError):
        return None, replay


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    pending = list(reversed(messages))

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _without_body(send: Send) -> Send:
    """A HEAD answered by Django as a GET: the same start, every body message emptied."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return wrapped
