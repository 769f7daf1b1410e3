"""Typed payloads of the Kurs API and its events.

Every JSON number that is a price or an amount becomes a `Decimal` (the answer is parsed with
`parse_float=Decimal`: no value ever passes through a float); times become aware `datetime`s.
Fields the server adds that this version does not know are kept, as parsed, in `extra`, so a
newer server never breaks an older client. A missing required field is a `SchemaError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Self, TypeAlias

from kurs_client.errors import SchemaError

# One rule for every model: these names are decimals, these are times, wherever they appear.
DECIMALS = frozenset(
    {
        "value",
        "bid",
        "ask",
        "buy",
        "sell",
        "rate",
        "result",
        "amount",
        "open",
        "high",
        "low",
        "close",
        "median",
        "age_s",
        "spread_bps",
        "dispersion_bps",
        "deviation",
    }
)
TIMES = frozenset(
    {
        "source_time",
        "checked_at",
        "received_at",
        "created_at",
        "updated_at",
        "last_success",
        "last_error_at",
        "valid_from",
        "valid_until",
        "served_at",
        "t",
    }
)
# JSON keys that are Python keywords.
RENAMED = {"from": "from_"}


def loads(text: str | bytes) -> Any:
    """JSON with every non-integer number as a Decimal."""
    return json.loads(text, parse_float=Decimal)


def decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SchemaError(f"expected a number, got {value!r}")
    return Decimal(value)


def timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise SchemaError(f"expected an ISO-8601 time, got {value!r}")
    return datetime.fromisoformat(value)


def _convert(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in DECIMALS:
        return decimal(value)
    if key in TIMES:
        return timestamp(value)
    return value


@dataclass(frozen=True, kw_only=True)
class Model:
    """A payload: its known fields as attributes, anything newer in `extra`."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Fields holding other models (or lists of them): how to build each.
    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    @classmethod
    def from_json(cls, data: Any) -> Self:
        if not isinstance(data, Mapping):
            raise SchemaError(f"{cls.__name__}: expected a JSON object, got {data!r}")
        known = {f.name for f in fields(cls) if f.init and f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            name = RENAMED.get(key, key)
            if name not in known:
                extra[key] = value
            elif name in cls.nested and value is not None:
                values[name] = cls.nested[name](value)
            else:
                values[name] = _convert(key, value)
        try:
            return cls(**values, extra=extra)
        except TypeError as exc:  # a required field is missing
            raise SchemaError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def many(cls, data: Any) -> list[Self]:
        if not isinstance(data, list):
            raise SchemaError(f"{cls.__name__}: expected a JSON array, got {data!r}")
        return [cls.from_json(entry) for entry in data]


@dataclass(frozen=True, kw_only=True)
class RouteLeg(Model):
    """One leg of a cross rate, as its provider quoted it."""

    pair: str
    provider: str
    value: Decimal
    source_time: datetime


@dataclass(frozen=True, kw_only=True)
class Source(Model):
    """One provider's quote under a consensus (`expand=sources`)."""

    provider: str
    value: Decimal
    bid: Decimal | None = None
    ask: Decimal | None = None
    source_time: datetime | None = None
    age_s: Decimal | None = None
    excluded: bool = False
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class Pricing(Model):
    """What every current-rate payload may carry beyond the value: the evidence, the sides, and
    the served version (point in time). None where this server does not send it."""

    bid: Decimal | None = None
    ask: Decimal | None = None
    spread_bps: Decimal | None = None
    buy: Decimal | None = None
    sell: Decimal | None = None
    mode: str | None = None
    n_sources: int | None = None
    dispersion_bps: Decimal | None = None
    sources: list[Source] | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    seq: int | None = None

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "sources": Source.many,
        "route": RouteLeg.many,
    }


@dataclass(frozen=True, kw_only=True)
class CurrentRate(Pricing):
    """`GET /items/{id}/rates/latest`, and an item's `latest`."""

    provider: str
    value: Decimal
    source_time: datetime
    checked_at: datetime
    received_at: datetime
    age_s: Decimal
    status: str
    derived: bool
    route: list[RouteLeg]
    version: int


@dataclass(frozen=True, kw_only=True)
class PairRate(Pricing):
    """`GET /rates/{base}/{quote}`: any pair, tracked or not."""

    pair: str
    value: Decimal
    provider: str
    source_time: datetime
    age_s: Decimal
    derived: bool
    stale: bool
    status: str | None = None
    route: list[RouteLeg] | None = None


@dataclass(frozen=True, kw_only=True)
class Conversion(Pricing):
    """`GET`/`POST /convert`."""

    from_: str
    to: str
    amount: Decimal
    rate: Decimal
    result: Decimal
    provider: str | None
    source_time: datetime | None
    age_s: Decimal | None = None
    derived: bool | None = None
    stale: bool | None = None
    status: str | None = None
    route: list[RouteLeg] | None = None
    side: str | None = None


@dataclass(frozen=True, kw_only=True)
class Rate(Model):
    """A history row: what one provider said."""

    provider: str
    value: Decimal
    bid: Decimal | None
    ask: Decimal | None
    source_time: datetime
    received_at: datetime


@dataclass(frozen=True, kw_only=True)
class RatePage(Model):
    items: list[Rate]
    count: int

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"items": Rate.many}


@dataclass(frozen=True, kw_only=True)
class Candle(Model):
    t: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    n: int


@dataclass(frozen=True, kw_only=True)
class Item(Model):
    """A tracked pair; `latest` is its current rate where the answer includes it."""

    id: int
    code: str
    base: str
    quote: str
    name: str
    is_active: bool
    created_at: datetime
    updated_at: datetime
    latest: CurrentRate | None = None
    pricing: str | None = None
    markup_bps: Decimal | None = None

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"latest": CurrentRate.from_json}


@dataclass(frozen=True, kw_only=True)
class ItemPage(Model):
    items: list[Item]
    count: int

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"items": Item.many}


@dataclass(frozen=True, kw_only=True)
class Course(Model):
    """One course of `/courses` (the seed format)."""

    direction: str
    value: Decimal
    exchanger: str | None = None
    stale: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Courses(Model):
    exchanger: str | None
    courses: list[Course]

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"courses": Course.many}


@dataclass(frozen=True, kw_only=True)
class Exclusion(Model):
    """Since when a consensus has left a provider out, and of which pairs."""

    since: datetime
    pairs: list[str]


@dataclass(frozen=True, kw_only=True)
class Provider(Model):
    name: str
    priority: int
    state: str
    last_success: datetime | None
    last_error: str | None
    errors_5m: int
    streaming: bool
    last_error_at: datetime | None = None
    excluded: Exclusion | None = None

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"excluded": Exclusion.from_json}


@dataclass(frozen=True, kw_only=True)
class Health(Model):
    """`status` ok, degraded or down; `components` as the server reports them."""

    status: str
    components: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class FetchReport(Model):
    """`POST /tasks/run`, and the data of `fetch.completed` (`shards`: the shards whose pairs
    the cycle quoted, with sharded owners; None otherwise)."""

    stored: int
    providers: dict[str, str]
    duration_ms: int
    shards: list[int] | None = None


# --- Events (docs/events.md) -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RateUpdate(Pricing):
    """The data of `rate.updated`: a pair's current rate, numbered by `version`."""

    direction: str
    value: Decimal
    provider: str
    source_time: datetime
    checked_at: datetime
    status: str
    derived: bool
    route: list[RouteLeg] | None
    version: int


@dataclass(frozen=True, kw_only=True)
class SnapshotCourse(RateUpdate):
    """A course of a snapshot: a rate update plus its staleness and age."""

    stale: bool
    age_s: Decimal


@dataclass(frozen=True, kw_only=True)
class Snapshot(Model):
    """The current course of each subscribed pair; `pairs` None: every active pair."""

    courses: list[SnapshotCourse]
    pairs: list[str] | None = None

    nested: ClassVar[Mapping[str, Callable[[Any], Any]]] = {"courses": SnapshotCourse.many}


@dataclass(frozen=True, kw_only=True)
class Gap(Model):
    """A resume asked for events the server no longer holds (or of a stream made anew since):
    `snapshot` is the fresh state that replaces them (the client attaches the snapshot that
    follows the server's `gap` frame)."""

    since: int
    first_available: int | None
    snapshot: Snapshot | None = None


@dataclass(frozen=True, kw_only=True)
class ItemDeleted(Model):
    id: int
    code: str


@dataclass(frozen=True, kw_only=True)
class ProviderState(Model):
    name: str
    state: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class QuoteExcluded(Model):
    direction: str
    provider: str
    value: Decimal
    median: Decimal
    reason: str


@dataclass(frozen=True, kw_only=True)
class PegChange(Model):
    """`peg.broken` / `peg.restored`."""

    asset: str
    reference: str
    value: Decimal | None
    band: Any
    evidence: Any = None


@dataclass(frozen=True, kw_only=True)
class Inbound(Model):
    """A foreign message on a subject Kurs follows."""

    subject: str
    payload: Any


EventData: TypeAlias = (
    RateUpdate
    | Snapshot
    | Gap
    | Item
    | ItemDeleted
    | ProviderState
    | FetchReport
    | QuoteExcluded
    | PegChange
    | Inbound
    | dict[str, Any]
)

EVENT_DATA: Mapping[str, Callable[[Any], EventData]] = {
    "rate.updated": RateUpdate.from_json,
    "snapshot": Snapshot.from_json,
    "gap": Gap.from_json,
    "item.created": Item.from_json,
    "item.updated": Item.from_json,
    "item.deleted": ItemDeleted.from_json,
    "provider.state": ProviderState.from_json,
    "fetch.completed": FetchReport.from_json,
    "quote.excluded": QuoteExcluded.from_json,
    "peg.broken": PegChange.from_json,
    "peg.restored": PegChange.from_json,
    "nats.inbound": Inbound.from_json,
}


@dataclass(frozen=True)
class Event:
    """One event of the stream: `type`, its typed `data` (a dict for types this version does
    not know, and for `error`: `{"detail": ...}`), and `seq`, the resume point (None for frames
    the server did not number); `epoch`, on a snapshot (and a gap), the stream `seq` belongs to."""

    type: str
    data: EventData
    seq: int | None = None
    ts: datetime | None = None
    id: str | None = None
    epoch: str | None = None

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any]) -> Event:
        kind = envelope.get("type")
        if not isinstance(kind, str):
            raise SchemaError(f"an event without a type: {envelope!r}")
        raw = envelope.get("data")
        if kind == "error":
            raw = {"detail": envelope.get("detail")}
        build = EVENT_DATA.get(kind)
        data: EventData = build(raw) if build is not None else dict(raw or {})
        seq = envelope.get("seq")
        ts = envelope.get("ts")
        epoch = envelope.get("epoch")
        return cls(
            type=kind,
            data=data,
            seq=seq if isinstance(seq, int) else None,
            ts=timestamp(ts) if ts else None,
            id=envelope.get("id"),
            epoch=epoch if isinstance(epoch, str) else None,
        )
