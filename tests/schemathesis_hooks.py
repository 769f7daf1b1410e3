"""schemathesis hooks for `tests/test_schemathesis.py`: the cross-field rules of the API.

JSON Schema describes each parameter alone; these rules join two of them, so the OpenAPI says
them in words (the descriptions) and a generated case that breaks one is a request the API
rightly refuses with 422. Only such cases are dropped here, each rule once; nothing else is.
- history and candles: `until` later than `since`;
- candles: at most 1000 candles from `since` to `until` (`rates.selectors.MAX_CANDLES`);
- a pair (`/rates/{base}/{quote}`, `POST /items`): base and quote differ.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis

MAX_CANDLES = 1000
CANDLE_SECONDS = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _path(context: schemathesis.HookContext) -> str:
    return context.operation.path if context.operation is not None else ""


def _range_ok(query: dict[str, Any], *, candles: bool) -> bool:
    since, until = _time(query.get("since")), _time(query.get("until"))
    try:
        if candles and until is None and since is not None:
            until = datetime.now(UTC)
        if since is None or until is None:
            return True
        if until <= since:
            return False
        if candles:
            width = CANDLE_SECONDS.get(str(query.get("interval") or "1m"), 60)
            return (until - since) / timedelta(seconds=width) < MAX_CANDLES
    except OverflowError:
        return False
    return True


@schemathesis.hook
def filter_query(context: schemathesis.HookContext, query: dict[str, Any] | None) -> bool:
    path = _path(context)
    if not query:
        return True
    if path.endswith("/candles"):
        return _range_ok(query, candles=True)
    if path.endswith("/rates"):
        return _range_ok(query, candles=False)
    return True


def _code(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


@schemathesis.hook
def filter_path_parameters(context: schemathesis.HookContext, path_parameters: Any) -> bool:
    if not isinstance(path_parameters, dict) or "base" not in path_parameters:
        return True
    return _code(path_parameters.get("base")) != _code(path_parameters.get("quote"))


@schemathesis.hook
def filter_body(context: schemathesis.HookContext, body: Any) -> bool:
    if _path(context) != "/api/v1/items" or not isinstance(body, dict):
        return True
    return _code(body.get("base")) != _code(body.get("quote"))
