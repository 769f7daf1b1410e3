"""Sustained exclusions: since when a consensus has left each provider out. Pure.

The owner observes, at every tick, which providers the current version of each consensus-priced
pair excludes (`rates.provider_health`); `track` keeps, per provider, since when it has been
excluded from at least one pair without interruption, and from which pairs. `/providers`, health
and `kurs_provider_excluded_seconds` show it (docs/rates.md#consensus-pricing). With sharded
owners each tracks its own shards' pairs, and `/providers` shows them `merged`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

# A provider excluded this long without interruption makes health `degraded`. Honest sources
# leave the consensus briefly: CoinGecko's price is cached for 60 s and trails a fast minute by
# up to ~1 %, and agrees again at its next refresh. Five minutes is five such refreshes and many
# polls: an exclusion still there then is a source that is wrong, not late
# (docs/rates.md#consensus-pricing).
DEGRADED_AFTER = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A provider left out of at least one pair since `since`; `pairs` those it is out of now."""

    since: datetime
    pairs: tuple[str, ...]


def by_provider(excluded: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    """{pair: the providers it excludes now} as {provider: the pairs it is excluded from}."""
    pairs: dict[str, set[str]] = {}
    for pair, providers in excluded.items():
        for provider in providers:
            pairs.setdefault(provider, set()).add(pair)
    return {provider: tuple(sorted(codes)) for provider, codes in pairs.items()}


def track(previous: Exclusion | None, pairs: Iterable[str], *, now: datetime) -> Exclusion | None:
    """The provider's exclusion at `now`, given the last one and the pairs excluding it now:
    None when no pair does; otherwise it keeps its `since` as long as some pair always did."""
    current = tuple(sorted(pairs))
    if not current:
        return None
    return Exclusion(since=previous.since if previous else now, pairs=current)


def merged(parts: Iterable[Exclusion | None]) -> Exclusion | None:
    """One provider's exclusions from several owners (one per shard of pairs) as one: the pairs
    of all, since the earliest start (excluded from some pair all along since then)."""
    found = [part for part in parts if part is not None]
    if not found:
        return None
    pairs = sorted({pair for part in found for pair in part.pairs})
    return Exclusion(since=min(part.since for part in found), pairs=tuple(pairs))


def overdue(since: datetime, *, now: datetime, after: timedelta = DEGRADED_AFTER) -> bool:
    """Has an exclusion that started at `since` lasted longer than `after`?"""
    return now - since > after
