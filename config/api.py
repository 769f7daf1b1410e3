"""The NinjaAPI instance: version, renderer, the routers, and the one error shape.

Every error leaves as JSON `{"detail": ...}`: the domain exceptions by the one table of
`edge.errors` (which the edge's route table answers from too), ninja's validation and HTTP errors
here. Only `config.urls` imports this module (an import-linter contract): the encoder lives in
`config.jsonenc`, auth and throttling in `edge.security`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from ninja import NinjaAPI
from ninja.errors import HttpError, ValidationError
from ninja.openapi.schema import OpenAPISchema
from ninja.parser import Parser
from ninja.renderers import BaseRenderer

from config.jsonenc import dumps, loads
from edge.answer import to_response
from edge.errors import STATUS, answer_for
from edge.health import router as health_router
from items.api import router as items_router
from rates.api import router as rates_router
from rates.udf_api import router as udf_router

logger = logging.getLogger(__name__)


class DecimalJSONRenderer(BaseRenderer):
    media_type = "application/json"

    def render(self, request: HttpRequest, data: Any, *, response_status: int) -> str:
        return dumps(data)


class DecimalJSONParser(Parser):
    """Request bodies with exact decimals: an amount of 0.1 must never pass through a float."""

    def parse_body(self, request: HttpRequest) -> Any:
        return loads(request.body)


# The alternative every optional query parameter has: `?since=&provider=` means absent
# (docs/api.md#query-parameters); the edge drops such values before either entrance reads them.
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


def on_mapped_error(request: HttpRequest, exc: Exception) -> HttpResponseBase:
    answer = answer_for(exc)
    return on_unexpected(request, exc) if answer is None else to_response(answer)


for _mapped in STATUS:
    # ninja's ExcHandler type asks for an HttpResponse and an exception or its class; ninja
    # calls a handler with the instance and sends any response on (`to_response` returns an
    # HttpResponseBase, its 304 being a streaming response).
    api.add_exception_handler(_mapped, on_mapped_error)  # type: ignore[arg-type]  # ninja's type


api.add_router("/health", health_router)
api.add_router("/items", items_router)
api.add_router("", rates_router)
api.add_router("/udf", udf_router)
