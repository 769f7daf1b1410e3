"""The exceptions the client raises: every API error carries the server's `detail`."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any


class KursError(Exception):
    """Anything this client raises."""


class TransportError(KursError):
    """The server could not be reached, or the connection broke mid-answer."""


class SchemaError(KursError):
    """An answer lacks a field this client needs (the server and the client disagree)."""


class ApiError(KursError):
    """The API answered an error: `status`, and the `detail` it gave (docs/api.md#errors)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after


class BadRequest(ApiError):
    """400."""


class Unauthorized(ApiError):
    """401: a write without a valid API key."""


class Forbidden(ApiError):
    """403."""


class NotFound(ApiError):
    """404: an unknown item, a pair never quoted, an unknown path."""


class Conflict(ApiError):
    """409: the pair exists."""


class ValidationError(ApiError):
    """422: `detail` names each field; `errors` lists `{"field", "message"}`."""


class RateLimited(ApiError):
    """429: `retry_after` is the server's `Retry-After`, in seconds."""


class ServerError(ApiError):
    """5xx: 503 is a temporary state (`retry_after` when the server gives one)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
    429: RateLimited,
}


def api_error(status: int, body: Any, headers: Mapping[str, str]) -> ApiError:
    """The exception for an error answer: one mapping for every call and both clients."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        detail = f"HTTP {status}"
    errors = body.get("errors") if isinstance(body, dict) else None
    retry_after: float | None = None
    with contextlib.suppress(KeyError, ValueError):
        retry_after = float(headers["retry-after"])
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(
        status,
        detail,
        errors=errors if isinstance(errors, list) else None,
        retry_after=retry_after,
    )
