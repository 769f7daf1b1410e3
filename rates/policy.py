"""Provider policy: priority, freshness, staleness, status and cross routes. Pure: no I/O.

Every caller that asks "is this rate fresh?" (validation, the owner's board, the web snapshot,
REST `latest`, health, the dashboard's JSON) asks `is_stale` here, so the rule is written once
(docs/architecture.md#one-owner-of-live-state: staleness is judged when read, from `checked_at` and
the serving provider's window).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings

from rates.providers import PROVIDER_CLASSES, Pair

# A cross rate is named after its legs' providers: `binance+cbr`.
DERIVED_SEPARATOR = "+"

LIVE = "live"
FAILOVER = "failover"
STALE = "stale"
# Consensus pricing with fewer agreeing sources than KURS_CONSENSUS_MIN_SOURCES.
THIN = "thin"

# How a pair is priced (docs/rates.md#consensus-pricing): the item's `pricing`, else KURS_PRICING.
PRIORITY = "priority"
CONSENSUS = "consensus"
# The provider a consensus-priced rate is served under (CurrentRate, history, /courses).
CONSENSUS_PROVIDER = "consensus"

# docs/rates.md#history: a provider's quote is stored when its value changed or the last stored
# one is this old, so a history row vouches for its value that long after `received_at`
# (the owner's writes and the served log's point-in-time sources both read it here).
STORE_EVERY = timedelta(seconds=60)

Priority = tuple[int, ...]


def provider_priority(name: str) -> Priority:
    """(0, index in KURS_PROVIDERS) for a provider; (1, leg, leg) for a cross rate.

    Lower is better: any direct quote outranks any cross rate.
    """
    order = settings.KURS_PROVIDERS
    if DERIVED_SEPARATOR in name:
        legs = name.split(DERIVED_SEPARATOR)
        return (1, *(order.index(leg) if leg in order else len(order) for leg in legs))
    return (0, order.index(name) if name in order else len(order))


def provider_freshness(name: str) -> float:
    """Seconds a quote of `name` stays fresh: its own window, else KURS_STALE_AFTER.

    A cross rate `a+b` is as fresh as its least fresh leg allows.
    """
    if DERIVED_SEPARATOR in name:
        return min(provider_freshness(leg) for leg in name.split(DERIVED_SEPARATOR))
    cls = PROVIDER_CLASSES.get(name)
    if cls is not None and cls.freshness is not None:
        return cls.freshness
    return float(settings.KURS_STALE_AFTER)


def fresh_until(provider: str, checked_at: datetime) -> datetime:
    """The moment a rate last confirmed at `checked_at` by `provider` turns stale."""
    return checked_at + timedelta(seconds=provider_freshness(provider))


def is_stale(provider: str, checked_at: datetime, *, now: datetime) -> bool:
    """The one freshness rule: stale once the provider's window has passed since confirmation."""
    return now > fresh_until(provider, checked_at)


def heartbeat_seconds() -> float:
    """How often an unchanged rate is confirmed: KURS_STALE_AFTER/2 (docs/rates.md#events).

    Half the window, so that a reader applying `is_stale` to the last confirmation never sees a
    live pair as stale between two heartbeats.
    """
    return settings.KURS_STALE_AFTER / 2


def serving_status(serving: Priority, best_possible: Priority | None) -> str:
    """`live` when the best provider that can quote the pair serves it, else `failover`."""
    if best_possible is None or serving <= best_possible:
        return LIVE
    return FAILOVER


def read_status(status: str, provider: str, checked_at: datetime, *, now: datetime) -> str:
    """A stored status as a reader must show it now: `stale` once its confirmation is too old."""
    return STALE if is_stale(provider, checked_at, now=now) else status


def canonical_asset(asset: str) -> str:
    """USDTTRC/USDTERC -> USDT (KURS_ASSET_ALIASES): what the markets quote."""
    return settings.KURS_ASSET_ALIASES.get(asset, asset)


def cross_routes(pair: Pair) -> list[tuple[Pair, Pair]]:
    """The (BASE-X, X-QUOTE) legs a pair can be derived from: X is USD, USDT and the USD proxy.

    With `KURS_USD_PROXY` empty, BTC-USD thus comes from a true USD quote or from
    BTC-USDT × USDT-USD (docs/rates.md#aliases-the-usd-proxy-and-cross-rates).
    """
    vias = dict.fromkeys(["USD", "USDT", settings.KURS_USD_PROXY or "USD"])
    assets = {canonical_asset(pair.base), canonical_asset(pair.quote)}
    return [(Pair(pair.base, via), Pair(via, pair.quote)) for via in vias if via not in assets]
