"""A per-provider circuit breaker: closed → open → half-open → closed.

Why not `purgatory` (evaluated at 3.0.1): its open period is one fixed TTL per circuit, so a 429's
`Retry-After` cannot lengthen one opening, and its back-off never grows for a provider that stays
down; it reads `time.time()` (a wall-clock step re-opens or closes circuits), and it only moves
from open to half-open inside the next call, so `GET /api/v1/providers` could not report the
state truthfully between calls. What Kurs needs is the sixty lines below.

Not thread-safe by design: each breaker lives in the one event loop of the fetching process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

StateListener = Callable[[str, str, str], None]  # (name, new state, reason)


class CircuitBreaker:
    """Opens after `threshold` consecutive failures (or at once on a rate limit).

    While open, `allow()` is False; after the back-off it half-opens and lets one probe through.
    A successful probe closes it; a failed one re-opens it with the back-off doubled, up to
    `max_backoff`. A rate limit keeps it open at least for the server's `Retry-After`.
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int = 3,
        backoff: float = 10.0,
        max_backoff: float = 300.0,
        on_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.base_backoff = backoff
        self.max_backoff = max_backoff
        self.on_change = on_change
        self.clock = clock
        self._state = CLOSED
        self.failures = 0
        self._backoff = backoff
        self.open_until = 0.0

    @property
    def state(self) -> str:
        """The state as of now; reading it changes nothing (`allow()` makes the move)."""
        if self._state == OPEN and self.clock() >= self.open_until:
            return HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open circuit half-opens (0 when calls are allowed)."""
        return max(0.0, self.open_until - self.clock()) if self.state == OPEN else 0.0

    def allow(self) -> bool:
        """May a call go out now? Half-opens an open circuit whose back-off has elapsed."""
        if self._state == OPEN and self.clock() >= self.open_until:
            self._move(HALF_OPEN, "back-off elapsed, probing")
        return self._state != OPEN

    def record_success(self) -> None:
        self.failures = 0
        self._backoff = self.base_backoff
        if self._state != CLOSED:
            self._move(CLOSED, "provider answered")

    def record_failure(self, reason: str, *, retry_after: float | None = None) -> None:
        self.failures += 1
        if retry_after is not None:
            # Rate limited: stop now and for as long as the server asked, whatever the count.
            self._open(reason, max(self._backoff, retry_after))
        elif self._state == HALF_OPEN:
            self._backoff = min(self.max_backoff, self._backoff * 2)
            self._open(reason, self._backoff)
        elif self._state == CLOSED and self.failures >= self.threshold:
            self._open(reason, self._backoff)

    def _open(self, reason: str, duration: float) -> None:
        self.open_until = self.clock() + duration
        self._move(OPEN, f"{reason} (retry in {duration:.0f}s)")

    def _move(self, state: str, reason: str) -> None:
        if state == self._state:
            return
        self._state = state
        if self.on_change is not None:
            self.on_change(self.name, state, reason)
