"""Provider health on the live owner, and its status in the shared cache.

Each provider has a `ProviderMonitor` (its circuit breaker, last success and error, recent
errors, stream state); it takes the provider's pairs down and up (`services.provider_set_down`)
and publishes `provider.state` on every breaker transition. The owner saves a status snapshot in
the "shared" cache (Redis with REDIS_URL, files under var/ otherwise), where
`GET /api/v1/providers` in any web process reads it (`provider_statuses`).

The status also says whether a consensus leaves the provider out, since when and of which pairs
(`observe_exclusions`, the rule in `rates.exclusions`): health calls a provider excluded for
longer than `exclusions.DEGRADED_AFTER` `degraded` (docs/rates.md#consensus-pricing). With
sharded owners every owner observes its own shards' pairs and saves one exclusion per provider
and shard (`EXCLUDED_KEY`), which `provider_statuses` merges.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.utils import timezone

from rates import exclusions, metrics, policy, services, shards
from rates.breaker import CLOSED, OPEN, CircuitBreaker
from rates.notices import OutageNotice
from rates.providers import ProviderRateLimited
from rates.providers.streaming import DISCONNECTED, STREAMING
from realtime import events

# The fetching process logs under one name, whichever of its modules speaks.
logger = logging.getLogger("rates.fetcher")

STATUS_KEY = "rates:provider:{name}"
# With sharded owners: each shard's owner saves which of its pairs exclude the provider here.
EXCLUDED_KEY = "rates:provider:{name}:excluded:{shard}of{count}"
ERROR_WINDOW = 300.0  # errors_5m


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


class ProviderMonitor:
    """Health of one provider on the owner: breaker, successes, errors, stream state.

    Status writes to the shared cache are never made on the event loop: `save()` only marks the
    status dirty, and the owner writes it with `flush_statuses()` from a worker thread.
    """

    def __init__(self, name: str, *, breaker: CircuitBreaker | None = None) -> None:
        self.name = name
        self.breaker = breaker or CircuitBreaker(name)
        self.breaker.on_change = self._on_breaker_change
        self.last_success: datetime | None = None
        self.last_error: str | None = None
        # When it happened: an old error beside a closed circuit is history, not a fault.
        self.last_error_at: datetime | None = None
        self.errors: deque[float] = deque()  # wall-clock times, so other processes can count
        self.streaming = False
        # When the stream last delivered a quote (monotonic), and how long it may then stay
        # silent and still count as a live source while REST fails (see `_is_down`).
        self.stream_quote_at: float | None = None
        self.stream_window = 5.0
        self.rest_failed = False
        # A run of failed rounds: (its monotonic start, rounds). It is logged once at WARNING
        # when it starts and once at INFO when it ends; the rounds and circuit moves between
        # are DEBUG, so that a provider down for an hour (or a `make run` with no network)
        # does not log every poll.
        self.outage: tuple[float, int] | None = None
        # Since when a consensus has left it out of some pair, and of which (None: of none).
        self.excluded: exclusions.Exclusion | None = None
        self.dirty = True
        # With sharded owners: the same per shard this process owns, and those not saved yet.
        self.excluded_in: dict[int, exclusions.Exclusion | None] = {}
        self.shards_dirty: set[int] = set()
        metrics.CIRCUIT_STATE.labels(name).set(0)
        metrics.PROVIDER_EXCLUDED.labels(name).set(0)

    def _on_breaker_change(self, name: str, state: str, reason: str) -> None:
        # Within an outage already said (or its end, said by `succeeded`), a circuit move is
        # detail; on its own (none so far) it is news.
        level = logging.DEBUG if self.outage is not None or state == CLOSED else logging.INFO
        logger.log(level, "%s circuit %s: %s", name, state, reason, extra={"provider": name})
        metrics.CIRCUIT_STATE.labels(name).set(metrics.CIRCUIT_VALUES[state])
        if services.get_board().global_writable():
            events.publish("provider.state", {"name": name, "state": state, "reason": reason})
        self.save()

    def succeeded(self) -> None:
        self.last_success = timezone.now()
        self.rest_failed = False
        if self.outage is not None:
            started, rounds = self.outage
            logger.info(
                "%s answers again (after %d failed rounds in %.0fs)",
                self.name,
                rounds,
                time.monotonic() - started,
                extra={"provider": self.name},
            )
        self.outage = None
        self.breaker.record_success()
        self._update_down()
        self.save()

    def failed(self, reason: str, *, kind: str, retry_after: float | None = None) -> None:
        if self.outage is None:
            self.outage = (time.monotonic(), 1)
            logger.warning(
                "%s failing: %s (logged again when it answers; failures until then at DEBUG)",
                self.name,
                reason,
                extra={"provider": self.name},
            )
        else:
            self.outage = (self.outage[0], self.outage[1] + 1)
            logger.debug("%s: %s", self.name, reason, extra={"provider": self.name})
        now = time.time()
        self.last_error = reason
        self.last_error_at = timezone.now()
        self.errors.append(now)
        self.rest_failed = True
        metrics.PROVIDER_ERRORS.labels(self.name, kind).inc()
        self.breaker.record_failure(reason, retry_after=retry_after)
        self._update_down()
        self.save()

    def stream_state(self, state: str, reason: str) -> None:
        streaming = state == STREAMING
        if streaming:  # reported with a connection's first quote
            self.stream_quote_at = time.monotonic()
        if state == DISCONNECTED:
            self.last_error = f"stream: {reason}"
            self.last_error_at = timezone.now()
            self.errors.append(time.time())
            metrics.PROVIDER_ERRORS.labels(self.name, "stream").inc()
        if streaming != self.streaming:
            self.streaming = streaming
            self._update_down()
        self.save()

    def probe_every(self, seconds: float) -> None:
        """Keep an open circuit's back-off under one poll, so a recovered provider serves again
        at the next poll; a rate limit still holds it open for its Retry-After. A
        stream silent for half that long no longer covers for a failing REST round."""
        self.stream_window = seconds / 2
        self.breaker.base_backoff = min(self.breaker.base_backoff, seconds)
        self.breaker.max_backoff = min(self.breaker.max_backoff, seconds)
        self.breaker.reset_backoff()

    def rate_limited(self, exc: ProviderRateLimited) -> None:
        """A 429/418 on a stream handshake: the same breaker as REST honours its Retry-After."""
        self.failed(str(exc), kind="rate_limited", retry_after=exc.retry_after)

    def _is_down(self) -> bool:
        """Down when its circuit is open, or when REST fails and no stream makes up for
        it. A stream counts only while it delivers: a connection that sends torn frames or
        lags far behind (garbage, slow) is no source, as a closed one is not."""
        if self.breaker.state == OPEN:
            return True
        if not self.rest_failed:
            return False
        quiet = self.stream_quote_at is None or (
            time.monotonic() - self.stream_quote_at > self.stream_window
        )
        return not self.streaming or quiet

    def _update_down(self) -> None:
        services.provider_set_down(self.name, self._is_down())

    def check_quiet(self) -> None:
        """Time alone takes a provider down: its stream fell silent while REST fails. Only a
        good REST round or a new stream connection brings it back, so a lagging stream's
        occasional late quote does not flip its pairs back and forth."""
        if self.name not in services.get_board().down and self._is_down():
            self._update_down()

    def stream_quote(self) -> None:
        """The stream delivered a valid quote (a success; the cache hears it at the next flush)."""
        self.last_success = timezone.now()
        self.stream_quote_at = time.monotonic()

    def excluded_from(self, pairs: tuple[str, ...], *, now: datetime) -> None:
        """The pairs whose current version leaves this provider out at `now`."""
        excluded = exclusions.track(self.excluded, pairs, now=now)
        if excluded != self.excluded:
            self.excluded = excluded
            self.save()
        seconds = (now - excluded.since).total_seconds() if excluded else 0.0
        metrics.PROVIDER_EXCLUDED.labels(self.name).set(max(0.0, seconds))

    def excluded_in_shards(
        self, owned: frozenset[int], count: int, pairs: tuple[str, ...], *, now: datetime
    ) -> None:
        """With sharded owners: the pairs of each owned shard that leave it out at `now`. A
        shard this process did not track yet is saved at once (over what an earlier owner
        saved); one it no longer owns is forgotten (its new owner saves it)."""
        for shard in set(self.excluded_in) - owned:
            del self.excluded_in[shard]
            self.shards_dirty.discard(shard)
        for shard in owned:
            mine = [pair for pair in pairs if shards.shard_of(pair, count) == shard]
            previous = self.excluded_in.get(shard)
            excluded = exclusions.track(previous, mine, now=now)
            if shard not in self.excluded_in or excluded != previous:
                self.excluded_in[shard] = excluded
                self.shards_dirty.add(shard)

    def status(self, *, priority: int) -> dict[str, Any]:
        cutoff = time.time() - ERROR_WINDOW
        while self.errors and self.errors[0] < cutoff:
            self.errors.popleft()
        return {
            "name": self.name,
            "priority": priority,
            "state": self.breaker.state,
            "last_success": _iso(self.last_success),
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "error_times": list(self.errors),
            "streaming": self.streaming,
            "excluded": _exclusion_json(self.excluded),
        }

    def save(self) -> None:
        self.dirty = True

    def flush(self) -> None:
        """Write the status to the shared cache if it changed (sync: blocking I/O)."""
        board = services.get_board()
        if self.shards_dirty and board.writable():
            self._flush_shards()
        if not self.dirty or not board.global_writable():
            return
        self.dirty = False
        order = settings.KURS_PROVIDERS
        priority = order.index(self.name) if self.name in order else len(order)
        try:
            caches["shared"].set(
                STATUS_KEY.format(name=self.name), self.status(priority=priority), None
            )
        except Exception as exc:
            # The status page is a convenience: a cache outage must not stop fetching.
            self.dirty = True
            status_saving.failed(exc)
        else:
            status_saving.worked()

    def _flush_shards(self) -> None:
        dirty, self.shards_dirty = self.shards_dirty, set()
        count = shards.shard_count()
        values = {
            EXCLUDED_KEY.format(name=self.name, shard=shard, count=count): _exclusion_json(
                self.excluded_in.get(shard)
            )
            for shard in dirty
        }
        try:
            caches["shared"].set_many(values, None)
        except Exception as exc:
            self.shards_dirty |= dirty
            status_saving.failed(exc)


def _exclusion_json(excluded: exclusions.Exclusion | None) -> dict[str, Any] | None:
    if excluded is None:
        return None
    return {"since": _iso(excluded.since), "pairs": list(excluded.pairs)}


def _exclusion_of(saved: Any) -> exclusions.Exclusion | None:
    if not saved:
        return None
    return exclusions.Exclusion(
        since=datetime.fromisoformat(saved["since"]), pairs=tuple(saved["pairs"])
    )


def status_saving_notice() -> OutageNotice:
    return OutageNotice(
        "cannot save provider statuses to the shared cache (retried at every flush, said again "
        "when it works): %s",
        "provider statuses are saved to the shared cache again",
    )


def status_reading_notice() -> OutageNotice:
    return OutageNotice(
        "provider statuses: the shared cache is unreachable, the statuses last read are "
        "answered (said again when it works): %s",
        "provider statuses are read from the shared cache again",
    )


status_saving = status_saving_notice()
status_reading = status_reading_notice()


_monitors: dict[str, ProviderMonitor] = {}


def monitor_for(name: str) -> ProviderMonitor:
    """The process-wide monitor of a provider (created on first use)."""
    if name not in _monitors:
        _monitors[name] = ProviderMonitor(name)
    return _monitors[name]


def observe_exclusions(*, now: datetime) -> None:
    """Tell each provider's monitor which pairs a consensus leaves it out of now: those whose
    current version (not `stale`: a stale version rests on no source) excludes it. A cross
    rate's exclusion counts against each of its providers: there is no telling which leg is off.
    """
    board = services.get_board()
    excluded: dict[str, set[str]] = {}
    for pair in list(board.items):
        if not board.owned(pair):
            continue  # another shard's owner observes it
        current = board.get_current(pair)
        if current is not None and current.status != policy.STALE:
            excluded[pair] = {
                name
                for source in current.excluded_providers
                for name in source.split(policy.DERIVED_SEPARATOR)
            }
    pairs = exclusions.by_provider(excluded)
    for name in set(settings.KURS_PROVIDERS) | set(_monitors) | set(pairs):
        monitor = monitor_for(name)
        monitor.excluded_from(pairs.get(name, ()), now=now)
        if board.shards is not None:
            count = shards.shard_count()
            monitor.excluded_in_shards(board.shards, count, pairs.get(name, ()), now=now)


def flush_statuses(*, now: datetime | None = None) -> None:
    """Save every changed provider status (sync; the owner calls it off its event loop), the
    exclusions observed at `now` included: by every owner, of its own shards' pairs."""
    if services.get_board().writable():
        observe_exclusions(now=now or timezone.now())
    for monitor in list(_monitors.values()):
        monitor.flush()


# What this process last read from the shared cache: served while the cache is unreachable.
_last_read_statuses: dict[str, Any] = {}


def provider_statuses() -> list[dict[str, Any]]:
    """Each configured provider's status as the fetching process last saved it.

    With the shared cache unreachable (a Redis outage) the statuses this process last read are
    answered: an older view beats a 500 on `/providers` and a health that calls them all down.
    """
    names = list(settings.KURS_PROVIDERS)
    count = shards.shard_count()
    keys = [STATUS_KEY.format(name=name) for name in names]
    if count > 1:
        keys += [
            EXCLUDED_KEY.format(name=name, shard=shard, count=count)
            for name in names
            for shard in range(count)
        ]
    try:
        saved = caches["shared"].get_many(keys)
    except Exception as exc:
        status_reading.failed(exc)
        saved = dict(_last_read_statuses)
    else:
        status_reading.worked()
        _last_read_statuses.clear()
        _last_read_statuses.update(saved)
    cutoff = time.time() - ERROR_WINDOW
    statuses = []
    for priority, name in enumerate(names):
        status = saved.get(STATUS_KEY.format(name=name)) or {}
        excluded = status.get("excluded")
        if count > 1:
            # Each shard's owner saved its own pairs' exclusion of this provider.
            excluded = _exclusion_json(
                exclusions.merged(
                    _exclusion_of(saved.get(EXCLUDED_KEY.format(name=name, shard=s, count=count)))
                    for s in range(count)
                )
            )
        statuses.append(
            {
                "name": name,
                "priority": priority,
                "state": status.get("state", "closed"),
                "last_success": status.get("last_success"),
                "last_error": status.get("last_error"),
                "last_error_at": status.get("last_error_at"),
                "errors_5m": sum(1 for at in status.get("error_times", ()) if at >= cutoff),
                "streaming": bool(status.get("streaming", False)),
                "excluded": excluded,
            }
        )
    return statuses


def check_all_quiet() -> None:
    """Time passed: a provider whose stream fell silent while REST fails goes down now."""
    for monitor in list(_monitors.values()):
        monitor.check_quiet()
