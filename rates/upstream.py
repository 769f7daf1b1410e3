"""What on-demand pricing may ask of the exchanges: round budgets and request weights.

Two bounds, both in-process and pure (no Django, no I/O), so that the providers can report to
them from `Provider.get_json`, whoever calls it:

- `RoundBudget`: token buckets for on-demand rounds (a pair priced anew, not from the answer
  cache), one for every client together and one per client address. A round beyond either raises
  `OnDemandBudgetExceeded`, which the API answers with 429 and `Retry-After`.
- `WeightLedger` (`weights`): each exchange's request weight used in its current window. The
  exchange's own count wins where it publishes one (Binance's `X-MBX-USED-WEIGHT-1M` counts every
  request from the IP, the fetcher's included, even from another process); otherwise requests
  are counted here. Every request is recorded, the fetcher's too, but only on-demand asks
  `spare()` before spending: it keeps off the last part of each limit, which is the fetcher's,
  so tracked pairs always keep priority. A rate limit the exchange answered holds on-demand off
  that exchange for its Retry-After.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rates.exceptions import OnDemandBudgetExceeded


@dataclass(frozen=True, slots=True)
class WeightLimit:
    """An exchange's published limit: `limit` weight per fixed `window` of seconds."""

    limit: int
    window: float


# provider-formats: Binance 6000 REQUEST_WEIGHT per minute per IP; Bybit 600 requests per 5 s
# per IP (then 403 and a 10-minute ban); CoinGecko's keyless API about 30 calls per minute. The
# Bank of Russia's file publishes no limit.
LIMITS: dict[str, WeightLimit] = {
    "binance": WeightLimit(6000, 60.0),
    "bybit": WeightLimit(600, 5.0),
    "coingecko": WeightLimit(30, 60.0),
}
# On-demand spends only while the window's weight stays under this share of the limit: the
# rest is the fetcher's (its polls, retries and a restart's burst), which never waits.
ON_DEMAND_SHARE = 0.5


class WeightLedger:
    """Request weight used per exchange in its current fixed window (thread-safe)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._used: dict[str, tuple[int, int]] = {}  # provider -> (window number, weight)
        self._held: dict[str, float] = {}  # provider -> wall time until which on-demand waits

    def record(self, provider: str, weight: int, *, reported: int | None = None) -> None:
        """A request was made; `reported` is the window's total as the exchange counts it."""
        limit = LIMITS.get(provider)
        if limit is None:
            return
        window = self._window(limit)
        with self._lock:
            current, used = self._used.get(provider, (window, 0))
            used = used + weight if current == window else weight
            if reported is not None:
                # Answers can arrive out of order: the highest count of the window is the truth.
                used = max(used, reported)
            self._used[provider] = (window, used)

    def hold(self, provider: str, seconds: float | None) -> None:
        """The exchange refused for being asked too much: on-demand keeps off it for a while."""
        limit = LIMITS.get(provider)
        wait = seconds if seconds is not None else limit.window if limit else 60.0
        with self._lock:
            self._held[provider] = max(self._held.get(provider, 0.0), self._clock() + wait)

    def used(self, provider: str) -> int:
        limit = LIMITS.get(provider)
        if limit is None:
            return 0
        with self._lock:
            window, used = self._used.get(provider, (0, 0))
        return used if window == self._window(limit) else 0

    def spare(self, provider: str, weight: int) -> float:
        """0 when on-demand may spend `weight` now, else the seconds until it may try again."""
        now = self._clock()
        with self._lock:
            held = self._held.get(provider, 0.0)
        if held > now:
            return held - now
        limit = LIMITS.get(provider)
        if limit is None or self.used(provider) + weight <= limit.limit * ON_DEMAND_SHARE:
            return 0.0
        return limit.window - now % limit.window

    def clear(self) -> None:
        with self._lock:
            self._used.clear()
            self._held.clear()

    def _window(self, limit: WeightLimit) -> int:
        return int(self._clock() // limit.window)


weights = WeightLedger()


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now); refills first."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


# Distinct clients remembered at once; beyond that the fullest buckets (idle clients) go first.
MAX_CLIENTS = 10_000
# A bucket holds this many seconds of its rate: a page that asks for a handful of pairs at once
# is not refused, a client looping over pairs is slowed to the rate.
BURST_SECONDS = 2.0


class RoundBudget:
    """The global and per-client budgets for on-demand rounds."""

    def __init__(
        self,
        *,
        rate: float,
        client_rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        now = clock()
        self._global = TokenBucket(rate, max(1.0, rate * BURST_SECONDS), now)
        self._client_rate = client_rate
        self._clients: dict[str, TokenBucket] = {}

    def take(self, client: str | None) -> None:
        """Spend one round for `client` (None: only the global budget applies), or raise
        OnDemandBudgetExceeded with the seconds to wait; nothing is spent when refused."""
        now = self._clock()
        bucket = None if client is None else self._client(client, now)
        wait = max(self._global.wait(now), 0.0 if bucket is None else bucket.wait(now))
        if wait > 0:
            who = "all clients" if bucket is None or bucket.tokens >= 1 else "this client"
            raise OnDemandBudgetExceeded(
                f"too many new pairs priced on demand for {who}; retry in {math.ceil(wait)} s",
                retry_after=wait,
            )
        self._global.tokens -= 1
        if bucket is not None:
            bucket.tokens -= 1

    def _client(self, client: str, now: float) -> TokenBucket:
        bucket = self._clients.get(client)
        if bucket is None:
            if len(self._clients) >= MAX_CLIENTS:
                for bucket_ in self._clients.values():
                    bucket_.wait(now)  # refill, so that idle clients show as full
                idle = sorted(self._clients, key=lambda key: -self._clients[key].tokens)
                for key in idle[: MAX_CLIENTS // 10]:
                    del self._clients[key]
            rate = self._client_rate
            bucket = self._clients[client] = TokenBucket(rate, max(1.0, rate * BURST_SECONDS), now)
        return bucket
