"""`GET /api/v1/courses`: the seed's answer, built once per snapshot state and filter
(docs/api.md#get-apiv1courses).

Both entrances use this module: the ninja route (`rates.api`, the documented definition) and the
route table of the edge (`edge.routes`) that answers before Django. Each hands in the query and
the `If-None-Match` header and sends the `CoursesAnswer` it gets back as it is, so the two cannot
disagree on a byte.

A body depends on the snapshot (its `version` bumps on every change) and on time: a fresh course
turns stale when its provider's freshness window passes, without any event. So a cached body is
reused only while the snapshot version is unchanged and the earliest such flip among its courses
has not come; `MAX_REUSE_S` bounds the reuse as well, so even a staleness rule this module does
not know about (the read model's) shows within a second, the `max-age` the edge gives the answer
(`edge.caching`, the one place `Cache-Control` is decided).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from django.conf import settings

from config.jsonenc import dumps
from rates.policy import provider_freshness
from rates.snapshot import snapshot

CONTENT_TYPE = "application/json; charset=utf-8"
MAX_DIRECTIONS = 100
MAX_REUSE_S = 1.0
# Distinct filter combinations kept per snapshot version; past it the cache starts over, so a
# client walking through combinations costs rebuilds, never memory.
MAX_ENTRIES = 512
# Echoed input is cut to this length: an error never repeats a megabyte back.
ECHO_CHARS = 40
DERIVED_SEPARATOR = "+"

PAIR_RE = re.compile(r"^[A-Z0-9]{2,12}-[A-Z0-9]{2,12}$")


class CourseSource(Protocol):
    """What the builder reads: `rates.snapshot.RatesSnapshot` (a fake in tests)."""

    @property
    def version(self) -> int: ...

    def active_pairs(self) -> frozenset[str]: ...

    def courses(self, pairs: Iterable[str] | None = None) -> list[dict[str, Any]]: ...


class InvalidCoursesQuery(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class CoursesQuery:
    """A normalised filter: `directions` None means every active pair."""

    directions: tuple[str, ...] | None
    exchanger: str | None


@dataclass(slots=True)
class _Built:
    body: bytes
    etag: str
    valid_until: float
    stamp: tuple[int, int]  # (snapshot version, cache generation) it was built for
    ok: tuple[tuple[str, str], ...] = field(init=False)
    not_modified: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.ok = (("Content-Type", CONTENT_TYPE), ("ETag", self.etag))
        self.not_modified = (("ETag", self.etag),)


@dataclass(frozen=True, slots=True)
class CoursesAnswer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]
    # The cached body behind a 200 or 304 (None for an error): `CoursesCache.is_current` tells
    # a caller that memoises what it sent whether the answer still stands.
    built: _Built | None = None


def _echo(value: str) -> str:
    return repr(value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…")


def parse_query(
    directions: Sequence[str], exchanger: str | None, *, providers: Sequence[str]
) -> CoursesQuery:
    """Normalise the raw query values; InvalidCoursesQuery names the field at fault.

    `direction` may repeat and may hold a comma-separated list; codes are normalised like item
    codes (`btc-usd` -> `BTC-USD`), duplicates dropped, the order kept. Empty values are absent.
    `exchanger` is a configured provider, or a cross-rate name of configured providers
    (`binance+cbr`; an unencoded `+` arrives as a space).
    """
    wanted: list[str] = []
    for raw in directions:
        if not raw.isascii():  # upper() folds some letters into ASCII: "ß" is "SS"
            raise InvalidCoursesQuery("direction", "use BASE-QUOTE in ASCII, e.g. BTC-USD")
        for part in raw.split(","):
            code = part.strip().upper()
            if not code:
                continue
            if not PAIR_RE.match(code):
                message = f"{_echo(part.strip())} is not a pair: use BASE-QUOTE, e.g. BTC-USD"
                raise InvalidCoursesQuery("direction", message)
            if code not in wanted:
                wanted.append(code)
                if len(wanted) > MAX_DIRECTIONS:
                    raise InvalidCoursesQuery(
                        "direction", f"at most {MAX_DIRECTIONS} pairs in one request"
                    )
    if exchanger is not None and not exchanger.isascii():
        raise InvalidCoursesQuery("exchanger", "unknown provider (a provider name is ASCII)")
    name = (exchanger or "").strip().lower().replace(" ", DERIVED_SEPARATOR) or None
    if name is not None and not all(leg in providers for leg in name.split(DERIVED_SEPARATOR)):
        configured = ", ".join(providers)
        raise InvalidCoursesQuery(
            "exchanger", f"unknown provider {_echo(name)} (configured: {configured})"
        )
    return CoursesQuery(directions=tuple(wanted) or None, exchanger=name)


def error_answer(exc: InvalidCoursesQuery) -> CoursesAnswer:
    """422 in the API's one validation-error shape (config.api.on_validation_error)."""
    body = dumps(
        {"detail": f"{exc.field}: {exc}", "errors": [{"field": exc.field, "message": str(exc)}]}
    )
    return CoursesAnswer(422, body.encode(), (("Content-Type", CONTENT_TYPE),))


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 13.1.2: `*` or any listed tag, compared weakly (a `W/` prefix is ignored)."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def render(courses: list[dict[str, Any]], exchanger: str | None) -> bytes:
    """The seed format: one `exchanger`, or `"mixed"` and each course naming its own."""
    if exchanger is None:
        providers = {course["provider"] for course in courses}
        exchanger = providers.pop() if len(providers) == 1 else ("mixed" if providers else None)
    mixed = exchanger == "mixed"
    out = []
    for course in courses:
        item: dict[str, Any] = {"direction": course["direction"], "value": course["value"]}
        if mixed:
            item["exchanger"] = course["provider"]
        if course["stale"]:
            item["stale"] = True
        out.append(item)
    return dumps({"exchanger": exchanger, "courses": out}).encode()


def _next_flip(courses: list[dict[str, Any]], now: float) -> float:
    """When the first fresh course among these turns stale (infinity when none is fresh)."""
    flips = [
        now + provider_freshness(course["provider"]) - float(course["age_s"])
        for course in courses
        if not course["stale"]
    ]
    # A millisecond past the flip: `age_s` is rounded to one, and `stale` is a strict `>`.
    return min(flips, default=float("inf")) + 0.001


class CoursesCache:
    """Precomputed bodies per filter, valid for one snapshot version until the next flip."""

    def __init__(
        self,
        source: CourseSource,
        *,
        providers: Callable[[], Sequence[str]],
        clock: Callable[[], float] = time.time,
        max_reuse_s: float = MAX_REUSE_S,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._source = source
        self._providers = providers
        self._clock = clock
        self._max_reuse_s = max_reuse_s
        self._max_entries = max_entries
        self._version = -1
        self._generation = 0
        self._built: dict[CoursesQuery, _Built] = {}
        self._answers: dict[tuple[str, str | None], CoursesAnswer] = {}
        self.builds = 0  # how many bodies were rendered: tests watch reuse with it

    def answer(
        self, directions: Sequence[str], exchanger: str | None, if_none_match: str | None
    ) -> CoursesAnswer:
        try:
            query = parse_query(directions, exchanger, providers=self._providers())
            built = self._get(query)
        except InvalidCoursesQuery as exc:
            return error_answer(exc)
        if if_none_match is not None and etag_matches(if_none_match, built.etag):
            return CoursesAnswer(304, b"", built.not_modified, built)
        return CoursesAnswer(200, built.body, built.ok, built)

    def answer_query(self, query: str, if_none_match: str | None) -> CoursesAnswer:
        """`answer` for a query string, read as Django's QueryDict reads it (blank values kept,
        `&` only, the last `exchanger` wins); remembered for as long as it stands."""
        key = (query, if_none_match)
        known = self._answers.get(key)
        if known is not None and known.built is not None and self.is_current(known.built):
            return known
        directions: list[str] = []
        exchanger: str | None = None
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == "direction":
                directions.append(value)
            elif name == "exchanger":
                exchanger = value
        answer = self.answer(directions, exchanger, if_none_match)
        if answer.built is not None:  # errors echo their input: not worth keeping
            if len(self._answers) >= self._max_entries:
                self._answers.clear()
            self._answers[key] = answer
        return answer

    def is_current(self, built: _Built) -> bool:
        """Whether `answer` would still give this body (no change, no flip, no clear since)."""
        return built.stamp == (self._source.version, self._generation) and (
            self._clock() < built.valid_until
        )

    def clear(self) -> None:
        self._built.clear()
        self._answers.clear()
        self._generation += 1

    def _get(self, query: CoursesQuery) -> _Built:
        version = self._source.version
        now = self._clock()
        if version != self._version or len(self._built) >= self._max_entries:
            self.clear()
            self._version = version
        built = self._built.get(query)
        if built is None or now >= built.valid_until:
            built = self._build(query, now, (version, self._generation))
            self._built[query] = built
        return built

    def _build(self, query: CoursesQuery, now: float, stamp: tuple[int, int]) -> _Built:
        self.builds += 1
        if query.directions is None:
            courses = self._source.courses()
        else:
            active = self._source.active_pairs()
            unknown = [code for code in query.directions if code not in active]
            if unknown:
                # Not cached: the message echoes the input, and the pair may be added any time.
                raise InvalidCoursesQuery(
                    "direction", f"unknown pair {_echo(unknown[0])}: not an active item"
                )
            found = self._source.courses(query.directions)
            by_code = {course["direction"]: course for course in found}
            courses = [by_code[code] for code in query.directions if code in by_code]
        if query.exchanger is not None:
            courses = [course for course in courses if course["provider"] == query.exchanger]
        body = render(courses, query.exchanger)
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        valid_until = min(_next_flip(courses, now), now + self._max_reuse_s)
        return _Built(body=body, etag=etag, valid_until=valid_until, stamp=stamp)


def _configured_providers() -> Sequence[str]:
    return settings.KURS_PROVIDERS


# The process's one cache, shared by the ninja route and the edge's route table.
courses_cache = CoursesCache(snapshot, providers=_configured_providers)
