"""The outermost middleware: request id, the access log line, and two `/api/` rules of SPEC 5.

- Every request gets an id: a sane incoming `X-Request-ID` (from nginx or a client) is kept,
  otherwise one is generated; it is returned as `X-Request-ID` and is on every log line of
  the request (see `config.logs`).
- One access log line per request (`kurs.access`), whatever server runs Django: the servers' own
  access logs are switched off in `LOGGING`, so nothing is logged twice.
- Under `/api/`, empty query parameters mean absent (`?since=&provider=` is no filter, not a 422),
  once here instead of in every schema; a 404 is JSON `{"detail": ...}` in every mode, also
  with DEBUG on, where Django would answer its HTML debug page, and so is a 405 (with `Allow`);
- every answer under `/api/` and of `/metrics` carries a `Cache-Control` (`config.caching`).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict

from config.caching import cache_control
from config.logs import request_id

access_logger = logging.getLogger("kurs.access")

HEADER = "X-Request-ID"
# Anything else (too long, spaces, control characters) could forge log lines or bloat them.
_SANE_ID = re.compile(r"^[A-Za-z0-9._:+/=-]{8,128}$")


class _RequestIds:
    """New request ids: 32 hex digits, a random per-process prefix and a counter.

    Unique like uuid4's without its `os.urandom` system call per request (12 % of the /courses
    fast path's time under load, profiled with py-spy). A forked child draws a new prefix.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = _RequestIds()


def request_id_for(incoming: str) -> str:
    """A sane incoming `X-Request-ID`, else a new one (also for the ASGI fast path)."""
    return incoming if incoming and _SANE_ID.match(incoming) else new_request_id()


def log_access(
    method: str, full_path: str, path: str, status: int, duration_ms: float, client: str | None
) -> None:
    """The one access line of a request (Django's or the /courses fast path's)."""
    access_logger.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "%s %s %d %.1fms",
        method,
        full_path,
        status,
        duration_ms,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration_ms, 2),
            "client": client,
        },
    )


def _incoming_id(request: HttpRequest) -> str:
    return request_id_for(request.META.get("HTTP_X_REQUEST_ID", ""))


def _drop_empty_query_values(request: HttpRequest) -> None:
    if not request.META.get("QUERY_STRING"):
        return
    lists = list(request.GET.lists())
    if all(value != "" for _, values in lists for value in values):
        return
    kept = QueryDict(mutable=True)
    for key, values in lists:
        non_empty = [value for value in values if value != ""]
        if non_empty:
            kept.setlist(key, non_empty)
    kept._mutable = False
    request.GET = kept


_JSON_ERRORS = {404: "not found", 405: "method not allowed"}


def _json_error(response: HttpResponse) -> HttpResponse:
    detail = _JSON_ERRORS.get(response.status_code)
    if detail is None or response.get("Content-Type", "").startswith("application/json"):
        return response
    json_response = JsonResponse({"detail": detail}, status=response.status_code)
    if "Allow" in response:
        json_response["Allow"] = response["Allow"]
    return json_response


class HybridMiddleware:
    """A middleware that stays on the event loop under ASGI and is plain under WSGI.

    Subclasses say what happens `before` the view (its result is the request's state), `after`
    it (the response they return goes out) and in `finish`, which runs whatever happened.
    """

    async_capable = True
    sync_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self._async:
            return self._acall(request)
        state = self.before(request)
        try:
            return self.after(request, self.get_response(request), state)
        finally:
            self.finish(state)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        state = self.before(request)
        try:
            return self.after(request, await self.get_response(request), state)
        finally:
            self.finish(state)

    def before(self, request: HttpRequest) -> Any:
        return None

    def after(self, request: HttpRequest, response: HttpResponse, state: Any) -> HttpResponse:
        return response

    def finish(self, state: Any) -> None:
        return None


class RequestContextMiddleware(HybridMiddleware):
    def before(self, request: HttpRequest) -> tuple[str, bool, float, Token[str | None]]:
        rid, is_api, started = self._before(request)
        return rid, is_api, started, request_id.set(rid)

    def after(
        self, request: HttpRequest, response: HttpResponse, state: tuple[str, bool, float, Any]
    ) -> HttpResponse:
        rid, is_api, started, _ = state
        return self._after(request, response, rid, is_api, started)

    def finish(self, state: tuple[str, bool, float, Token[str | None]]) -> None:
        request_id.reset(state[3])

    @staticmethod
    def _before(request: HttpRequest) -> tuple[str, bool, float]:
        rid = _incoming_id(request)
        request.request_id = rid  # type: ignore[attr-defined]
        is_api = request.path.startswith("/api/")
        if is_api:
            _drop_empty_query_values(request)
        return rid, is_api, time.perf_counter()

    @staticmethod
    def _after(
        request: HttpRequest, response: HttpResponse, rid: str, is_api: bool, started: float
    ) -> HttpResponse:
        if is_api:
            response = _json_error(response)
        policy = cache_control(request.method or "", request.path, response.status_code)
        if policy is not None and "Cache-Control" not in response:
            response["Cache-Control"] = policy
        response[HEADER] = rid
        log_access(
            request.method or "",
            request.get_full_path(),
            request.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
            request.META.get("REMOTE_ADDR"),
        )
        return response
