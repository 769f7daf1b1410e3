"""The web process's snapshot of the current rate of each active pair
(docs/architecture.md#inside-a-web-process).

It is first loaded from the read model (`CurrentRate`, written by the live owner), then kept
current by the realtime bridge from `rate.updated` and `item.*` events, so that readers (the
WebSocket snapshot, `/courses`) answer from memory. Rate events are applied in per-pair `version`
order: one that arrives late (an older version, e.g. from the fallback bus) never overwrites a
newer one. Staleness is judged when read, by `rates.policy`. Writes come from the bridge's event
loop and from the loading thread; a lock keeps them apart, and reads take it too.
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

from items.models import Item
from rates import policy
from rates.consensus import spread_bps, with_markup
from rates.models import CurrentRate, ServedRate
from rates.validation import DECIMAL_PLACES

logger = logging.getLogger(__name__)

_NO_MARKUP = Decimal(0)


# The evidence fields of a current rate (docs/api.md#json-shapes) and what they are when an
# older writer left them out: one list for the event, the row and the snapshot.
EVIDENCE_DEFAULTS: dict[str, Any] = {
    "mode": policy.PRIORITY,
    "n_sources": 1,
    "dispersion_bps": None,
    "bid": None,
    "ask": None,
    "spread_bps": None,
}
# Every evidence field a payload may carry (docs/api.md#json-shapes).
EVIDENCE_FIELDS = (*EVIDENCE_DEFAULTS, "buy", "sell", "sources")


@dataclass(frozen=True, slots=True)
class Course:
    direction: str
    value: Decimal
    provider: str
    source_time: datetime
    checked_at: datetime
    status: str
    derived: bool
    version: int
    route: tuple[dict[str, Any], ...] = ()
    # `mode`, `n_sources`, `dispersion_bps`, `bid`, `ask`, `spread_bps`: computed once by the
    # owner for this version, shown as they are.
    evidence: tuple[tuple[str, Any], ...] = ()
    # Every source considered (shown with `expand=sources`).
    sources: tuple[dict[str, Any], ...] = ()

    def to_dict(
        self, now: datetime, *, expand: bool = False, markup_bps: Decimal = _NO_MARKUP
    ) -> dict[str, Any]:
        status = policy.read_status(self.status, self.provider, self.checked_at, now=now)
        return {
            "direction": self.direction,
            "value": self.value,
            "provider": self.provider,
            "source_time": self.source_time,
            "checked_at": self.checked_at,
            "status": status,
            "derived": self.derived,
            "route": list(self.route),
            "version": self.version,
            "stale": status == policy.STALE,
            "age_s": round(max(0.0, (now - self.checked_at).total_seconds()), 3),
            **rate_evidence(
                self.value,
                dict(self.evidence),
                self.sources,
                now=now,
                expand=expand,
                markup_bps=markup_bps,
            ),
        }

    @property
    def fresh_until(self) -> datetime:
        """When this course turns stale unless a newer event arrives."""
        return policy.fresh_until(self.provider, self.checked_at)


def _parse_time(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _decimal(value: Any) -> Decimal:
    parsed = value if isinstance(value, Decimal) else Decimal(str(value))
    if not parsed.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    return parsed


def route_from_db(legs: Any) -> tuple[dict[str, Any], ...]:
    """A cross rate's legs from JSON (an event, or the CurrentRate column) with typed values."""
    if not legs:
        return ()
    return tuple(
        {
            "pair": str(leg["pair"]),
            "provider": str(leg["provider"]),
            "value": _decimal(leg["value"]),
            "source_time": _parse_time(leg["source_time"]),
        }
        for leg in legs
    )


def _optional_decimal(value: Any) -> Decimal | None:
    return None if value is None else _decimal(value)


def sources_to_db(sources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sources as JSON text values (the CurrentRate column), exact decimals as strings."""
    return [
        {
            **source,
            "value": format(source["value"], "f"),
            "bid": None if source["bid"] is None else format(source["bid"], "f"),
            "ask": None if source["ask"] is None else format(source["ask"], "f"),
            "source_time": _parse_time(source["source_time"]).isoformat(),
        }
        for source in sources
    ]


def sources_from_db(sources: Any) -> tuple[dict[str, Any], ...]:
    """Sources from JSON (an event, or the CurrentRate column) with typed values."""
    if not sources:
        return ()
    return tuple(
        {
            "provider": str(source["provider"]),
            "value": _decimal(source["value"]),
            "bid": _optional_decimal(source.get("bid")),
            "ask": _optional_decimal(source.get("ask")),
            "source_time": _parse_time(source["source_time"]),
            "excluded": bool(source.get("excluded", False)),
            "reason": None if source.get("reason") is None else str(source["reason"]),
        }
        for source in sources
    )


def rate_evidence(
    value: Decimal,
    evidence: dict[str, Any],
    sources: Iterable[dict[str, Any]],
    *,
    now: datetime,
    expand: bool,
    markup_bps: Decimal,
) -> dict[str, Any]:
    """The evidence fields of a current-rate payload (docs/api.md#json-shapes): the owner's
    (`mode`, `n_sources`, `dispersion_bps`, `bid`, `ask`, `spread_bps`), the item's `buy` and
    `sell`, and with `expand` the `sources`. The one function every surface renders them with."""
    found = {**EVIDENCE_DEFAULTS, **evidence}
    found["buy"], found["sell"] = with_markup(
        value, found["bid"], found["ask"], markup_bps, places=DECIMAL_PLACES
    )
    if expand:
        found["sources"] = sources_view(sources, now=now)
    return found


def sources_view(sources: Iterable[dict[str, Any]], *, now: datetime) -> list[dict[str, Any]]:
    """`sources` as payloads show them (`expand=sources`), each with its age at `now`."""
    return [
        {**source, "age_s": round(max(0.0, (now - source["source_time"]).total_seconds()), 3)}
        for source in sources
    ]


def evidence_from(data: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The evidence fields of an event's data or a row's fields, typed, defaults for absent."""
    found: dict[str, Any] = {
        name: data.get(name, default) for name, default in EVIDENCE_DEFAULTS.items()
    }
    found["mode"] = str(found["mode"])
    found["n_sources"] = int(found["n_sources"] or 1)
    for name in ("dispersion_bps", "bid", "ask", "spread_bps"):
        found[name] = _optional_decimal(found[name])
    return tuple(found.items())


def course_from_event(data: dict[str, Any]) -> Course:
    """A `rate.updated` payload as a Course; ValueError when it is malformed."""
    try:
        source_time = _parse_time(data["source_time"])
        checked_at = data.get("checked_at")
        return Course(
            direction=str(data["direction"]),
            value=_decimal(data["value"]),
            provider=str(data["provider"]),
            source_time=source_time,
            checked_at=_parse_time(checked_at) if checked_at is not None else source_time,
            status=str(data.get("status") or policy.LIVE),
            derived=bool(data.get("derived", False)),
            version=int(data.get("version") or 0),
            route=route_from_db(data.get("route")),
            evidence=evidence_from(data),
            sources=sources_from_db(data.get("sources")),
        )
    except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
        raise ValueError(f"malformed rate.updated data: {exc}") from None


def course_from_row(code: str, row: CurrentRate | ServedRate) -> Course:
    """A current-rate row (or a served-log version) as a snapshot course."""
    return Course(
        direction=code,
        value=row.value,
        provider=row.provider,
        source_time=row.source_time,
        checked_at=row.checked_at,
        status=row.status,
        derived=row.derived,
        version=row.version,
        route=route_from_db(row.route),
        evidence=row_evidence(row),
        sources=sources_from_db(row.sources),
    )


def row_evidence(row: CurrentRate | ServedRate) -> tuple[tuple[str, Any], ...]:
    """The evidence fields of a CurrentRate (or served-log) row (`spread_bps` from its sides)."""
    return evidence_from(
        {
            **{name: getattr(row, name) for name in ("mode", "n_sources", "dispersion_bps")},
            "bid": row.bid,
            "ask": row.ask,
            "spread_bps": spread_bps(row.bid, row.ask, row.value),
        }
    )


def _markup_of(data: dict[str, Any]) -> Decimal:
    try:
        return _decimal(data.get("markup_bps") or 0)
    except (ValueError, InvalidOperation):
        return _NO_MARKUP


class RatesSnapshot:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._courses: dict[str, Course] = {}
        self._active: set[str] = set()
        # Each active pair's item markup (items.models.Item.markup_bps), for `buy` and `sell`.
        self._markup: dict[str, Decimal] = {}
        self._loaded = False
        self._version = 0
        self._items_generation = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def version(self) -> int:
        """Bumped on every change: a cheap key for a precomputed body or an ETag."""
        return self._version

    @property
    def items_generation(self) -> int:
        """Bumped by every item event (and load or reset): what an item cache is valid for."""
        return self._items_generation

    def version_of(self, code: str) -> int:
        """The `version` of the pair's current rate as the snapshot knows it (0: none)."""
        course = self._courses.get(code)  # one dict read: atomic, no lock needed
        return 0 if course is None else course.version

    def load(self) -> None:
        """Read the active items and the current rate of each from the read model (sync)."""
        items = list(Item.objects.filter(is_active=True).values_list("id", "code", "markup_bps"))
        codes = {item_id: code for item_id, code, _ in items}
        markup = {code: bps for _, code, bps in items}
        rows = CurrentRate.objects.filter(item_id__in=codes)
        loaded = {codes[row.item_id]: course_from_row(codes[row.item_id], row) for row in rows}
        with self._lock:
            self._active = set(codes.values())
            self._markup = markup
            for code, course in loaded.items():
                current = self._courses.get(code)
                # An event that arrived while we were reading may be newer than the row.
                if current is None or current.version < course.version:
                    self._courses[code] = course
            self._loaded = True
            self._version += 1
            self._items_generation += 1
        logger.info("snapshot: loaded %d active pairs, %d with a rate", len(items), len(loaded))

    async def aload(self) -> None:
        await sync_to_async(self.load)()

    def apply_rate(self, data: dict[str, Any]) -> Course | None:
        """Apply a `rate.updated` payload; None when it is older than what the snapshot has."""
        course = course_from_event(data)
        with self._lock:
            current = self._courses.get(course.direction)
            if current is not None and course.version and course.version <= current.version:
                return None
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
                self._markup[code] = _markup_of(data)
            else:
                self._active.discard(code)
            self._version += 1
            self._items_generation += 1

    def markup_of(self, code: str) -> Decimal:
        """The pair's item markup in bp (0 when unknown)."""
        return self._markup.get(code, _NO_MARKUP)

    def active_pairs(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._active)

    def courses(
        self, pairs: Iterable[str] | None = None, *, expand: bool = False
    ) -> list[dict[str, Any]]:
        """The latest course of each active pair asked for (all when None), sorted by pair.

        A pair never quoted is left out; each course says whether it is `stale`, and with
        `expand` lists its `sources`.
        """
        now = timezone.now()
        with self._lock:
            wanted = self._active if pairs is None else self._active.intersection(pairs)
            found = [self._courses[code] for code in sorted(wanted) if code in self._courses]
            markup = self._markup
        return [
            course.to_dict(now, expand=expand, markup_bps=markup.get(course.direction, _NO_MARKUP))
            for course in found
        ]

    def next_change(self, now: datetime | None = None) -> datetime | None:
        """The earliest moment a fresh course turns stale with no event (cache expiry)."""
        now = now or datetime.now(UTC)
        with self._lock:
            deadlines = [c.fresh_until for c in self._courses.values() if c.fresh_until >= now]
        return min(deadlines, default=None)

    def reset(self) -> None:
        """Forget everything (a new event loop in tests, or before a reload)."""
        with self._lock:
            self._courses.clear()
            self._active.clear()
            self._loaded = False
            self._version += 1
            self._items_generation += 1


snapshot = RatesSnapshot()


def courses(pairs: Iterable[str] | None = None, *, expand: bool = False) -> list[dict[str, Any]]:
    """Module-level shortcut: `snapshot.courses(pairs)`."""
    return snapshot.courses(pairs, expand=expand)
