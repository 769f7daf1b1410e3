"""Who may write (API keys) and how fast anyone may call (KURS_RATE_LIMIT and friends).

Reads are limited by the edge (`edge.layer`), before either entrance, with `ReadLimiter`: a fixed
window per client, counted in this worker process's memory. The limit is therefore per worker:
with N web workers a client gets at most N times KURS_RATE_LIMIT (the kernel spreads its
connections over them), and a limited deployment keeps the speed of the unlimited one (a shared
count would cost a cache round trip per request). The operations endpoints (health, `/metrics`,
the OpenAPI document and docs) count apart from the data reads, so a client reading hard from
the address of a probe does not turn the probe's answer into a 429.

`POST /tasks/run` is limited per API key in the shared cache (KURS_TASKS_RATE_LIMIT): each call
makes every exchange answer at once, so the budget must hold across every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


# --- Reads: in this process -----------------------------------------------------------------
# Clients remembered at most; past it the count starts over (a flood of addresses costs a reset
# of everyone's window, never memory).
MAX_CLIENTS = 100_000


class ReadLimiter:
    """Fixed windows of `period` seconds per (budget, client) in this process's memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[tuple[str, str], list[int]] = {}

    def wait(self, budget: str, client: str, limit: tuple[int, int]) -> float | None:
        """None when the request may go on; else the seconds until the client's next window."""
        count, period = limit
        now = self._clock()
        window = int(now // period)
        key = (budget, client)
        entry = self._counts.get(key)
        if entry is None or entry[0] != window:
            if len(self._counts) >= MAX_CLIENTS:
                self._counts.clear()
            entry = self._counts[key] = [window, 0]
        entry[1] += 1
        if entry[1] <= count:
            return None
        return (window + 1) * period - now

    def clear(self) -> None:
        self._counts.clear()


# --- Tasks: in the shared cache -------------------------------------------------------------
class KeyThrottle(BaseThrottle):
    """Fixed-window limit per API key (the address when keys are not required), counted in the
    shared cache; off when the setting named by `limit` is empty."""

    def __init__(self, scope: str = "tasks", limit: str = "KURS_TASKS_RATE_LIMIT") -> None:
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
        api_key = getattr(request, "auth", None)
        if api_key is not None and hasattr(api_key, "pk"):
            return f"key{api_key.pk}"
        return str(self.get_ident(request))

    def wait(self) -> float | None:
        return self._wait


tasks_throttle: list[BaseThrottle] = [KeyThrottle()]
