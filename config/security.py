"""Who may write (API keys) and how fast anyone may read (KURS_RATE_LIMIT), for every router."""

from __future__ import annotations

import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest
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
    """Fixed-window per-client limit from KURS_RATE_LIMIT, counted in the shared cache.

    Off (one attribute read) when the setting is empty, which is the default.
    """

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: HttpRequest) -> bool:
        limit = settings.KURS_RATE_LIMIT
        if limit is None:
            return True
        count, period = limit
        now = time.time()
        window = int(now // period)
        key = f"throttle:{self.get_ident(request)}:{period}:{window}"
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

    def wait(self) -> float | None:
        return self._wait


read_throttle = [ReadThrottle()]
