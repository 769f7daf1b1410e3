"""Who may write (API keys) and how fast anyone may call (KURS_RATE_LIMIT and friends)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja.security import APIKeyHeader, HttpBearer
from ninja.throttling import BaseThrottle

from items.selectors import api_key_get_active
from items.services import api_key_touch, hash_api_key


async def _authenticate_key(request: HttpRequest, raw_key: str | None) -> Any:
    if not settings.KURS_API_KEYS_REQUIRED:
        return "anonymous"
    if not raw_key:
        return None
    api_key = await api_key_get_active(key_hash=hash_api_key(raw_key))
    if api_key is None:
        return None
    await sync_to_async(api_key_touch)(api_key=api_key)
    return api_key


class ApiKeyHeaderAuth(APIKeyHeader):
    # Called even without the header, so it also admits everyone when keys are not required.
    param_name = "X-API-Key"

    async def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        return await _authenticate_key(request, key)


class ApiKeyBearerAuth(HttpBearer):
    def __call__(self, request: HttpRequest) -> Any:
        # Not ninja's: in DEBUG it logs the whole header of another scheme at ERROR, so a key sent
        # as `Basic kurs_...` would be written to the log in full.
        scheme, _, token = request.headers.get(self.header, "").partition(" ")
        if scheme.lower() != self.openapi_scheme or not token:
            return None
        return self.authenticate(request, token.strip())

    async def authenticate(self, request: HttpRequest, token: str) -> Any:
        return await _authenticate_key(request, token)


write_auth = [ApiKeyHeaderAuth(), ApiKeyBearerAuth()]


# --- Throttling -----------------------------------------------------------------------------
class ReadThrottle(BaseThrottle):
    """Fixed-window per-client limit, counted in the shared cache.

    `scope` keeps separate budgets: the operations endpoints (health, `/metrics`, the OpenAPI)
    count apart from the data reads, so a client reading hard from behind the same address as a
    probe does not turn the probe's answer into a 429. `limit` names the setting; off (one
    attribute read) when it is empty, which is the default of KURS_RATE_LIMIT.
    """

    def __init__(self, scope: str = "read", limit: str = "KURS_RATE_LIMIT") -> None:
        self.scope = scope
        self.limit = limit
        self._wait: float | None = None

    def allow_request(self, request: HttpRequest) -> bool:
        limit = getattr(settings, self.limit)
        if limit is None:
            return True
        count, period = limit
        now = time.time()
        window = int(now // period)
        key = f"throttle:{self.scope}:{self.client_key(request)}:{period}:{window}"
        # add() is a no-op when the key exists; incr() is atomic in Redis and locmem.
        cache.add(key, 0, timeout=period + 1)
        try:
            used = cache.incr(key)
        except ValueError:  # the key expired between add() and incr()
            cache.add(key, 1, timeout=period + 1)
            used = 1
        if used <= count:
            return True
        self._wait = (window + 1) * period - now
        return False

    def client_key(self, request: HttpRequest) -> str:
        return str(self.get_ident(request))

    def wait(self) -> float | None:
        return self._wait


class KeyThrottle(ReadThrottle):
    """Per API key (the address when keys are not required): `POST /tasks/run` makes the
    service call every exchange at once, so one key holder must not get it banned by them."""

    def client_key(self, request: HttpRequest) -> str:
        api_key = getattr(request, "auth", None)
        if api_key is not None and hasattr(api_key, "pk"):
            return f"key{api_key.pk}"
        return super().client_key(request)


read_throttle = [ReadThrottle()]
ops_throttle = [ReadThrottle(scope="ops")]
tasks_throttle = [KeyThrottle(scope="tasks", limit="KURS_TASKS_RATE_LIMIT")]


def throttled_view(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """The ops limit for plain Django views (`/metrics`, the OpenAPI document and docs):
    429 `{"detail"}` with `Retry-After`, as `config.api` answers for ninja routes."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        throttle = ReadThrottle(scope="ops")
        if not throttle.allow_request(request):
            return too_many_requests(throttle.wait())
        return view(request, *args, **kwargs)

    return wrapped


def too_many_requests(wait: float | None) -> HttpResponse:
    response = JsonResponse({"detail": "too many requests"}, status=429)
    response["Retry-After"] = str(max(1, math.ceil(wait or 1)))
    return response
