"""The in-process snapshot of the latest course of each active pair (ARCHITECTURE, web process).

It is first read from the database (the latest Rate per active item), then kept current by the
realtime bridge from `rate.updated` and `item.*` events, so that readers (the WebSocket snapshot,
`/courses`) answer from memory. Writes come from the bridge's event loop and from the loading
thread; a lock keeps them apart, and reads take it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from asgiref.sync import sync_to_async
from django.utils import timezone

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Course:
    direction: str
    value: Decimal
    provider: str
    source_time: datetime
    derived: bool

    def to_dict(self, now: datetime) -> dict[str, Any]:
        # One home for the freshness rule (daily CBR rates, cross rates): the rates services.
        from rates.services import provider_freshness

        age_s = max(0.0, (now - self.source_time).total_seconds())
        return {
            "direction": self.direction,
            "value": self.value,
            "provider": self.provider,
            "source_time": self.source_time.isoformat().replace("+00:00", "Z"),
            "derived": self.derived,
            "stale": age_s > provider_freshness(self.provider),
            "age_s": round(age_s, 3),
        }


def _parse_time(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def course_from_event(data: dict[str, Any]) -> Course:
    """A `rate.updated` payload as a Course; ValueError when it is malformed."""
    try:
        value = data["value"]
        return Course(
            direction=str(data["direction"]),
            value=value if isinstance(value, Decimal) else Decimal(str(value)),
            provider=str(data["provider"]),
            source_time=_parse_time(data["source_time"]),
            derived=bool(data.get("derived", False)),
        )
    except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
        raise ValueError(f"malformed rate.updated data: {exc}") from None


class RatesSnapshot:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._courses: dict[str, Course] = {}
        self._active: set[str] = set()
        self._loaded = False
        self._version = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def version(self) -> int:
        """Bumped on every change: a cheap key for a precomputed body or an ETag."""
        return self._version

    def load(self) -> None:
        """Read the active items and the current Rate of each from the database (sync).

        "Current" is `rates.selectors.rate_current`: failover applied to the history, the same
        rate the REST API stands behind.
        """
        from items.models import Item
        from rates.selectors import rate_current

        now = timezone.now()
        items = list(Item.objects.filter(is_active=True))
        loaded: dict[str, Course] = {}
        for item in items:
            rate = rate_current(item=item, now=now)
            if rate is not None:
                loaded[item.code] = Course(
                    direction=item.code,
                    value=rate.value,
                    provider=rate.provider,
                    source_time=rate.source_time,
                    derived=rate.derived,
                )
        with self._lock:
            self._active = {item.code for item in items}
            for code, course in loaded.items():
                current = self._courses.get(code)
                # An event that arrived while we were reading is newer than the database row.
                if current is None or current.source_time < course.source_time:
                    self._courses[code] = course
            self._loaded = True
            self._version += 1
        logger.info("snapshot: loaded %d active pairs, %d with a rate", len(items), len(loaded))

    async def aload(self) -> None:
        await sync_to_async(self.load)()

    def apply_rate(self, data: dict[str, Any]) -> Course:
        """Apply a `rate.updated` payload: the latest accepted rate wins."""
        course = course_from_event(data)
        with self._lock:
            self._courses[course.direction] = course
            self._version += 1
        return course

    def apply_item(self, event_type: str, data: dict[str, Any]) -> None:
        """Keep the set of active pairs current from `item.created|updated|deleted`."""
        code = str(data.get("code", ""))
        if not code:
            return
        with self._lock:
            if event_type == "item.deleted":
                self._active.discard(code)
                self._courses.pop(code, None)
            elif data.get("is_active", True):
                self._active.add(code)
            else:
                self._active.discard(code)
            self._version += 1

    def active_pairs(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._active)

    def courses(self, pairs: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The latest course of each active pair asked for (all when None), sorted by pair.

        A pair never quoted is left out; each course says whether it is `stale`.
        """
        now = datetime.now(UTC)
        with self._lock:
            wanted = self._active if pairs is None else self._active.intersection(pairs)
            found = [self._courses[code] for code in sorted(wanted) if code in self._courses]
        return [course.to_dict(now) for course in found]

    def reset(self) -> None:
        """Forget everything (a new event loop in tests, or before a reload)."""
        with self._lock:
            self._courses.clear()
            self._active.clear()
            self._loaded = False
            self._version += 1


snapshot = RatesSnapshot()


def courses(pairs: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Module-level shortcut: `snapshot.courses(pairs)`."""
    return snapshot.courses(pairs)
