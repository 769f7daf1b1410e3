"""Exception -> status: the one table both entrances answer errors from.

`config.api` registers it with the NinjaAPI (one handler for every class below); the fast
entrance (`edge.routes`) looks the same table up when a handler raises. Every answer is JSON
`{"detail": ...}`; an error about one input field also lists it in `errors`, the shape of the
API's validation errors (`config.api.on_validation_error`).
"""

from __future__ import annotations

import math

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest
from django.http.response import HttpResponseBase
from django.utils.deprecation import MiddlewareMixin
from ninja.errors import AuthenticationError, Throttled

from edge.answer import Answer, json_answer, to_response
from items.exceptions import InvalidItem, ItemAlreadyExists, ItemNotFound
from rates.exceptions import (
    InvalidQuery,
    NotServedAt,
    OnDemandBudgetExceeded,
    PairNotPriced,
    ProvidersUnavailable,
)

# class -> (status, a fixed detail, or None for the exception's own message)
STATUS: dict[type[Exception], tuple[int, str | None]] = {
    InvalidItem: (422, None),
    InvalidQuery: (422, None),
    ItemNotFound: (404, None),
    PairNotPriced: (404, None),
    NotServedAt: (404, None),
    Http404: (404, "not found"),
    ItemAlreadyExists: (409, None),
    ProvidersUnavailable: (503, None),
    AuthenticationError: (401, "a valid API key is required (X-API-Key or Bearer)"),
    Throttled: (429, "too many requests"),
    OnDemandBudgetExceeded: (429, None),
    # A body past DATA_UPLOAD_MAX_MEMORY_SIZE: the client's fault, not a 500.
    RequestDataTooBig: (413, "request body too large"),
    # The database's connection ended under a read (a restart, a failover, an administrator):
    # the edge tries a read once more on a new connection (`RETRY_HEADER`), then answers this.
    OperationalError: (503, "the database is unavailable; retry shortly"),
    InterfaceError: (503, "the database is unavailable; retry shortly"),
}
# Marks a database failure's answer, so that the edge retries a read once; never sent out.
RETRY_HEADER = "Kurs-Retry"
_DATABASE = (OperationalError, InterfaceError)


def database_failure(exc: Exception) -> bool:
    return isinstance(exc, _DATABASE)


def retry_after(wait: float | None) -> tuple[str, str]:
    return ("Retry-After", str(max(1, math.ceil(wait or 1))))


def answer_for(exc: Exception) -> Answer | None:
    """The answer to `exc` by the table (its class or a base class), None if not listed."""
    for cls in type(exc).__mro__:
        entry = STATUS.get(cls)
        if entry is not None:
            break
    else:
        return None
    status, detail = entry
    message = str(exc) if detail is None else detail
    field = getattr(exc, "field", None)
    if isinstance(field, str):
        errors = [{"field": field, "message": message}]
        return json_answer(status, {"detail": f"{field}: {message}", "errors": errors})
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, AuthenticationError):
        headers = (("WWW-Authenticate", 'Bearer realm="kurs"'),)
    elif isinstance(exc, Throttled):
        headers = (retry_after(exc.wait),)
    elif isinstance(exc, OnDemandBudgetExceeded):
        headers = (retry_after(exc.retry_after),)
    elif database_failure(exc):
        headers = (retry_after(1), (RETRY_HEADER, "database"))
    return json_answer(status, {"detail": message}, headers)


class DatabaseFailureMiddleware(MiddlewareMixin):
    """Django's own views (the dashboard, the admin) answer a database connection that ended
    under them as the API does: 503 JSON with Retry-After and the retry mark, so that the edge
    reads a GET once more on a new connection, rather than Django's HTML 500."""

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        if not database_failure(exception):
            return None
        answer = answer_for(exception)
        return None if answer is None else to_response(answer)
