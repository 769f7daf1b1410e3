"""The NinjaAPI instance: version, renderer, the routers, and the one error shape.

Every error leaves as JSON `{"detail": ...}`; domain exceptions are mapped here, once. Only
`config.urls` imports this module (an import-linter contract): the encoder lives in
`config.jsonenc`, auth and throttling in `config.security`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, Throttled, ValidationError
from ninja.openapi.schema import OpenAPISchema
from ninja.parser import Parser
from ninja.renderers import BaseRenderer

from config.health import router as health_router
from config.jsonenc import dumps, loads
from config.security import throttled_view
from items.api import router as items_router
from items.exceptions import InvalidItem, ItemAlreadyExists, ItemNotFound
from rates.api import router as rates_router
from rates.exceptions import (
    InvalidQuery,
    OnDemandBudgetExceeded,
    PairNotPriced,
    ProvidersUnavailable,
)

logger = logging.getLogger(__name__)


class DecimalJSONRenderer(BaseRenderer):
    media_type = "application/json"

    def render(self, request: HttpRequest, data: Any, *, response_status: int) -> str:
        return dumps(data)


class DecimalJSONParser(Parser):
    """Request bodies with exact decimals: an amount of 0.1 must never pass through a float."""

    def parse_body(self, request: HttpRequest) -> Any:
        return loads(request.body)


# The alternative every optional query parameter has (SPEC 5: `?since=&provider=` means absent,
# `config.middleware` drops such values before any schema reads them).
EMPTY_MEANS_ABSENT = {"type": "string", "maxLength": 0, "description": "empty: absent"}


class KursAPI(NinjaAPI):
    def get_openapi_schema(self, **kwargs: Any) -> OpenAPISchema:
        schema = super().get_openapi_schema(**kwargs)
        for operations in schema["paths"].values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "query" and not parameter.get("required"):
                        parameter["schema"] = {"anyOf": [parameter["schema"], EMPTY_MEANS_ABSENT]}
        return schema


# --- The API and its error mapping ----------------------------------------------------------
api = KursAPI(
    title="Kurs",
    version="1",
    description="Self-hosted exchange rates: tracked pairs, rates with failover, live events.",
    urls_namespace="api-v1",
    renderer=DecimalJSONRenderer(),
    parser=DecimalJSONParser(),
    # The OpenAPI document and the docs page count against the ops limit, as health does.
    docs_decorator=throttled_view,
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


@api.exception_handler(InvalidQuery)
def on_invalid_query(request: HttpRequest, exc: InvalidQuery) -> HttpResponse:
    return _error(
        request, f"{exc.field}: {exc}", 422, errors=[{"field": exc.field, "message": str(exc)}]
    )


@api.exception_handler(ItemNotFound)
def on_not_found(request: HttpRequest, exc: ItemNotFound) -> HttpResponse:
    return _error(request, str(exc), 404)


@api.exception_handler(PairNotPriced)
def on_pair_not_priced(request: HttpRequest, exc: PairNotPriced) -> HttpResponse:
    return _error(request, str(exc), 404)


@api.exception_handler(ProvidersUnavailable)
def on_providers_unavailable(request: HttpRequest, exc: ProvidersUnavailable) -> HttpResponse:
    return _error(request, str(exc), 503)


@api.exception_handler(OnDemandBudgetExceeded)
def on_budget_exceeded(request: HttpRequest, exc: OnDemandBudgetExceeded) -> HttpResponse:
    response = _error(request, str(exc), 429)
    response["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


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


api.add_router("/health", health_router)
api.add_router("/items", items_router)
api.add_router("", rates_router)
