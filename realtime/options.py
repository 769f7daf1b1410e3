"""A subscription's options, from a query string or a `subscribe` action
(docs/events.md#delivery-policy).

`pairs`, `since` (resume after that stream sequence), `epoch` (the stream that sequence was read
in), `min_interval_ms` and `min_change` (the
delivery policy). Shared by the WebSocket consumer and the SSE stream, so both read them alike.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from django.conf import settings

from realtime.hub import DeliveryPolicy
from realtime.stream_openapi import EPOCH_PATTERN

MAX_INTERVAL_MS = 3_600_000


class BadOption(ValueError):
    """An option's value is unusable; the message names it."""


def pairs_from_values(values: list[str] | None) -> list[str] | None:
    """`["BTC-USD,eth-rub"]` (or repeated) -> ["BTC-USD", "ETH-RUB"]; None when absent."""
    if not values:
        return None
    pairs = [p.strip().upper() for value in values for p in value.split(",") if p.strip()]
    return pairs or None


def parse_expand(value: Any) -> bool:
    """`expand=sources`: rate payloads list their sources; absent (None or "") means not."""
    if value is None or value == "":
        return False
    if value != "sources":
        raise BadOption("expand: expected sources")
    return True


def parse_since(value: Any) -> int | None:
    """A stream sequence: a whole number >= 0; None or "" when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadOption("since: expected a stream sequence (a whole number >= 0)")
    try:
        since = int(value)
    except (TypeError, ValueError):
        raise BadOption("since: expected a stream sequence (a whole number >= 0)") from None
    if since < 0:
        raise BadOption("since: expected a stream sequence (a whole number >= 0)")
    return since


def parse_epoch(value: Any) -> str | None:
    """A stream epoch (the `epoch` of a snapshot or gap frame); None or "" when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or re.fullmatch(EPOCH_PATTERN, value) is None:
        raise BadOption("epoch: expected a stream epoch (the epoch of a snapshot or gap frame)")
    return value


def delivery_policy(min_interval_ms: Any, min_change: Any) -> DeliveryPolicy | None:
    """The policy for these options (None or "" mean absent); None when neither is set."""
    interval = 0
    if min_interval_ms not in (None, ""):
        try:
            if isinstance(min_interval_ms, bool) or (
                isinstance(min_interval_ms, float) and not min_interval_ms.is_integer()
            ):
                raise ValueError
            interval = int(min_interval_ms)
        except (TypeError, ValueError):
            raise BadOption(f"min_interval_ms: expected 0 to {MAX_INTERVAL_MS}") from None
        if not 0 <= interval <= MAX_INTERVAL_MS:
            raise BadOption(f"min_interval_ms: expected 0 to {MAX_INTERVAL_MS}")
    change = Decimal(0)
    if min_change not in (None, ""):
        try:
            if isinstance(min_change, bool):
                raise ValueError
            number = float(min_change)
        except (TypeError, ValueError):
            raise BadOption("min_change: expected a fraction from 0 to 1") from None
        if not math.isfinite(number) or not 0 <= number <= 1:
            raise BadOption("min_change: expected a fraction from 0 to 1")
        change = Decimal(str(min_change))
    if interval == 0 and change == 0:
        return None
    return DeliveryPolicy(
        min_interval_s=interval / 1000,
        min_change=change,
        # "A heartbeat is due": the producer's own heartbeat period (docs/rates.md#events).
        heartbeat_s=settings.KURS_STALE_AFTER / 2,
    )
