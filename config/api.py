"""The NinjaAPI instance: version, renderer, auth, throttling, and the one error shape.

Every error leaves as JSON `{"detail": ...}`; domain exceptions are mapped here, once.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import simplejson
from django.conf import settings
from django.core.cache import cache
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, Throttled, ValidationError
from ninja.renderers import BaseRenderer
from ninja.security import APIKeyHeader, HttpBearer
from ninja.throttling import BaseThrottle

from items.exceptions import InvalidItem, ItemAlreadyExists, ItemNotFound

logger = logging.getLogger(__name__)


def _plain_decimal(value: Decimal) -> Decimal:
    """54000.000123000 -> 54000.000123; 5.4E+4 -> 54000: numbers as people write them."""
    return Decimal(format(value.normalize(), "f")) if value.is_finite() else value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(data: Any) -> str:
    """JSON with Decimals as exact JSON numbers (SPEC 5: full precision, never floats)."""
    return simplejson.dumps(
        _normalise(data), use_decimal=True, default=_json_default, separators=(",", ":")
    )


def _normalise(data: Any) -> Any:
    if isinstance(data, Decimal):
        return _plain_decimal(data)
    if isinstance(data, dict):
        return {key: _normalise(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_normalise(value) for value in data]
    return data


class DecimalJSONRenderer(BaseRenderer):
    media_type = "application/json"

    def render(self, request: HttpRequest, data: Any, *, response_status: int) -> str:
        return dumps(data)


# --- Auth -----------------------------------------------------------------------------------
async def _authenticate_key(request: HttpRequest, raw_key: str | None) -> Any:
    from asgiref.sync import sync_to_async

    from items.selectors import api_key_get_active
    from items.services import api_key_touch, hash_api_key

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


# --- The API and its error mapping ----------------------------------------------------------
api = NinjaAPI(
    title="Kurs",
    version="1",
    description="Self-hosted exchange rates: tracked pairs, rates with failover, live events.",
    urls_namespace="api-v1",
    renderer=DecimalJSONRenderer(),
)


def _error(request: HttpRequest, detail: Any, status: int, **extra: Any) -> HttpResponse:
    return api.create_response(request, {"detail": detail, **extra}, status=status)


def _field_of(loc: list[Any]) -> str:
    # ("body", "payload", "base") -> "base"; ("query", "limit") -> "limit"
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "payload")]
    return ".".join(parts) or ".".join(str(part) for part in loc)


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = [
        {
            "field": _field_of(list(error.get("loc", []))),
            # pydantic prefixes messages of custom validators with "Value error, ".
            "message": str(error.get("msg", "invalid")).removeprefix("Value error, "),
        }
        for error in exc.errors
    ]
    detail = "; ".join(f"{error['field']}: {error['message']}" for error in errors)
    return _error(request, detail or "invalid input", 422, errors=errors)


@api.exception_handler(InvalidItem)
def on_invalid_item(request: HttpRequest, exc: InvalidItem) -> HttpResponse:
    return _error(
        request, f"{exc.field}: {exc}", 422, errors=[{"field": exc.field, "message": str(exc)}]
    )


@api.exception_handler(ItemNotFound)
def on_not_found(request: HttpRequest, exc: ItemNotFound) -> HttpResponse:
    return _error(request, str(exc), 404)


@api.exception_handler(Http404)
def on_http404(request: HttpRequest, exc: Http404) -> HttpResponse:
    return _error(request, "not found", 404)


@api.exception_handler(ItemAlreadyExists)
def on_conflict(request: HttpRequest, exc: ItemAlreadyExists) -> HttpResponse:
    return _error(request, str(exc), 409)


@api.exception_handler(AuthenticationError)
def on_unauthorized(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = _error(request, "a valid API key is required (X-API-Key or Bearer)", 401)
    response["WWW-Authenticate"] = 'Bearer realm="kurs"'
    return response


@api.exception_handler(Throttled)
def on_throttled(request: HttpRequest, exc: Throttled) -> HttpResponse:
    response = _error(request, "too many requests", 429)
    response["Retry-After"] = str(max(1, math.ceil(exc.wait or 1)))
    return response


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    detail = str(exc)
    if exc.status_code == 400 and detail.startswith("Cannot parse request body"):
        detail = "malformed JSON body"
    return _error(request, detail, exc.status_code)


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    # A bug, not bad input: log it in full, answer without leaking internals.
    logger.exception("unhandled error on %s %s", request.method, request.path)
    return _error(request, "internal error", 500)


def _register_routers() -> None:
    from config.health import router as health_router
    from items.api import router as items_router

    api.add_router("/health", health_router)
    api.add_router("/items", items_router)

    from rates.api import router as rates_router

    api.add_router("", rates_router)


_register_routers()
