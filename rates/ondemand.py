"""The rate of any pair, and conversions (docs/api.md#get-apiv1ratesbasequote and `/convert`).

A tracked pair (an active item) is answered from the in-process snapshot, so it agrees with
`/courses` and the WebSocket; so are its inverse and its aliases (RUB-BTC from BTC-RUB, USDT-RUB
and RUB-USDTERC from USDTTRC-RUB): the tracked pair's current rate, inverted where needed, with
its provider, status and staleness, so that a round trip through `/convert` comes back to the
amount. Any other pair is priced on demand from the providers' market-wide listings:

1. Each provider's listing (every market it quotes, in one or two requests: `Provider.listing`)
   is fetched at most once per `listing_interval` (5 s for the exchanges, 30 s for CoinGecko,
   5 min for the Bank of Russia's daily file), failures included; concurrent askers share one
   request. Every on-demand pair is priced from these, so the upstream traffic they cause is
   bounded by the listing refresh rate whatever the clients ask.
2. A provider that lists the pair itself serves it; the highest-priority (`KURS_PROVIDERS`
   order) valid quote wins, so a failing or lying provider hands over to the next one.
3. Otherwise it is derived (`derived: true`, with its `route` of legs): from the inverted pair
   (RUB-BTC = 1 / BTC-RUB), else as a cross rate through USD, USDT, the USD proxy
   (`rates.policy.cross_routes`) or RUB (the Bank of Russia quotes every fiat currency against
   RUB, so AUD-CAD = AUD-RUB / CAD-RUB). Each leg may be quoted as asked or inverted; the route
   shows every leg as its provider quoted it.

On-demand quotes pass the same checks as tracked ones (`rates.validation`: a finite positive
value that fits the columns, a source time neither in the future nor older than the provider's
freshness window) but skip `accept_quote` on purpose: they are not tracked pairs, so they never
enter the live board (they must not move failover or the jump guard) nor the history.

Answers, found or not, are cached for CACHE_SECONDS (a failure for FAILURE_CACHE_SECONDS), and
concurrent identical requests share one round. A round (a pair not in that cache) spends one
token of the global and of the client's budget (`KURS_ONDEMAND_RATE`,
`KURS_ONDEMAND_CLIENT_RATE`, `rates.upstream.RoundBudget`): beyond either, 429. A listing is not
fetched while the exchange's request weight is near its limit (`rates.upstream.weights`): the
rest of the limit is the fetcher's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

import httpx
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from rates import pegs, policy, servedlog, validation
from rates.consensus import spread_bps, with_markup
from rates.exceptions import NotServedAt, PairNotPriced, ProvidersUnavailable, RatesError
from rates.fetcher import http_client
from rates.peg_monitor import proxy_peg
from rates.providers import Listing, Pair, Provider, ProviderError, Quote, build_providers
from rates.snapshot import EVIDENCE_DEFAULTS, EVIDENCE_FIELDS, rate_evidence, snapshot
from rates.upstream import RoundBudget, weights

logger = logging.getLogger(__name__)

# A few seconds: on-demand pairs are not tracked, so this is how old (beyond the exchange's own
# timestamp) their answer may get; KURS_POLL_INTERVAL keeps tracked pairs to 5 s as well.
CACHE_SECONDS = 5.0
# A failed round (providers down) is retried sooner, but not on every request.
FAILURE_CACHE_SECONDS = 1.0
# One provider request, and the whole on-demand round (both stages): under 5 s in all.
REQUEST_TIMEOUT = 3.0
ROUND_SECONDS = 4.5
# Cached answers kept at most (distinct pairs); expired ones go first, then the oldest.
MAX_CACHED = 10_000
# A provider's listing serves on-demand pairs this long before it is fetched again: the poll
# interval for the exchanges, a quarter of the freshness window for slower sources (CoinGecko's
# 60 s cache, the Bank of Russia's daily file), as the fetcher paces them, at most MAX_LISTING.
LISTING_SECONDS = 5.0
LISTING_FRACTION = 0.25
MAX_LISTING_SECONDS = 300.0
# Besides USD and USDT (cross_routes): the Bank of Russia quotes all its currencies against RUB.
EXTRA_VIAS = ("RUB",)
# Conversion results: as many decimal places as stored rates, banker's rounding (no bias).
RESULT_STEP = Decimal(1).scaleb(-validation.DECIMAL_PLACES)
# What an answer about an instant adds (rates.servedlog.ServedVersion.fields, and `sources`).
_SERVED_FIELDS = ("valid_from", "valid_until", "version", "seq", "sources")
# Exact products and quotients of 38-digit decimals before the one final rounding.
_PRECISION = 80
# Digits a derived rate keeps at least (route_value): two of them multiply to within 1e-23 of
# the exact product, so a rate and its reverse agree to the 18 places with margin.
SIGNIFICANT = 24
_EPOCH = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True, slots=True)
class Leg:
    """One quote a derived rate is built from, as the provider quoted it."""

    pair: str
    provider: str
    value: Decimal
    source_time: datetime
    fresh_until: datetime
    # Served through the USD proxy (BTC-USD from BTCUSDT): its peg applies (docs/rates.md#pegs).
    proxied: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair,
            "provider": self.provider,
            "value": self.value,
            "source_time": self.source_time,
        }


@dataclass(frozen=True, slots=True)
class PairRate:
    pair: str
    value: Decimal
    provider: str
    source_time: datetime
    fresh_until: datetime
    derived: bool
    # A higher-priority provider that lists one of the pairs failed or was rejected this round.
    failover: bool
    route: tuple[Leg, ...] = ()
    # How the USD proxy's peg enters the value: +1 per proxied leg multiplied, -1 per divided.
    peg_power: int = 0

    def to_dict(self, now: datetime) -> dict[str, Any]:
        stale = now > self.fresh_until
        return {
            "pair": self.pair,
            "value": self.value,
            "provider": self.provider,
            "source_time": self.source_time,
            "age_s": round(max(0.0, (now - self.source_time).total_seconds()), 3),
            "derived": self.derived,
            "stale": stale,
            "status": policy.STALE if stale else policy.FAILOVER if self.failover else policy.LIVE,
            "route": [leg.to_dict() for leg in self.route],
            # Priced on demand by one provider (or one route's legs): nothing to compare.
            **rate_evidence(
                self.value,
                dict(EVIDENCE_DEFAULTS),
                (),
                now=now,
                expand=False,
                markup_bps=Decimal(0),
            ),
        }


# A way to price a pair: its legs, each a pair to quote and whether to invert that quote.
Route = tuple[tuple[Pair, bool], ...]


def derivation_routes(pair: Pair) -> list[Route]:
    """Every way to derive `pair` when no provider quotes it, best first (pure)."""
    routes: list[Route] = [((Pair(pair.quote, pair.base), True),)]
    vias = [first.quote for first, _ in policy.cross_routes(pair)]
    vias += [via for via in EXTRA_VIAS if via not in (pair.base, pair.quote, *vias)]
    for via in vias:
        for first in ((Pair(pair.base, via), False), (Pair(via, pair.base), True)):
            for second in ((Pair(via, pair.quote), False), (Pair(pair.quote, via), True)):
                routes.append((first, second))
    return routes


def route_value(legs: Sequence[tuple[Leg, bool]]) -> Decimal:
    """The product of the legs, inverted ones dividing, rounded once: to the stored 18 decimal
    places, or to SIGNIFICANT digits where those are fewer (a small inverse: RUB-BTC).

    A pair and its reverse through one anchor then multiply to 1 within the stated 18 places
    (fixed places alone would leave 1/7200987.65 eleven digits, and the product off by 1e-12).
    Raises QuoteRejected when the result does not fit (e.g. it rounds to zero at 18 places).
    """
    with localcontext() as context:
        context.prec = _PRECISION
        numerator, denominator = Decimal(1), Decimal(1)
        for leg, inverted in legs:
            if inverted:
                denominator *= leg.value
            else:
                numerator *= leg.value
        exact = numerator / denominator
        validation.checked_value(exact)  # the bounds a stored rate has
        places = max(validation.DECIMAL_PLACES, SIGNIFICANT - 1 - exact.adjusted())
        return exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)


def listing_interval(provider: type[Provider] | Provider) -> float:
    """How long one listing of `provider` serves on-demand pairs before it is fetched again."""
    if provider.freshness is None:
        return LISTING_SECONDS
    return min(MAX_LISTING_SECONDS, max(LISTING_SECONDS, provider.freshness * LISTING_FRACTION))


@dataclass
class _ListingSlot:
    """One provider's last listing (or why there is none) and the refresh under way, if any."""

    listing: Listing | None = None
    error: str | None = None
    until: float = 0.0  # the clock time until which this outcome serves
    task: asyncio.Task[None] | None = None


@dataclass
class _Upstream:
    """The providers of one event loop, sharing one HTTP connection pool, and their listings."""

    client: httpx.AsyncClient
    providers: list[Provider]
    signature: tuple[Any, ...]
    listings: dict[str, _ListingSlot] = field(default_factory=dict)


@dataclass
class _Round:
    """What one on-demand lookup learned: valid quotes by pair (priority order) and failures."""

    quotes: dict[str, list[Leg]]
    failed: dict[str, str]


class OnDemandRates:
    """Rates of untracked pairs from the providers' listings, cached briefly, one round per pair
    at a time, within the round budgets.

    An httpx client (and a coalescing future) belongs to the event loop it was made on, so they
    are kept per loop: one per process in production, a fresh one per test loop.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cache: dict[str, tuple[float, PairRate | RatesError]] = {}
        self._inflight: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Task[PairRate]] = {}
        self._upstreams: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Upstream] = (
            weakref.WeakKeyDictionary()
        )
        self._budget: tuple[tuple[float, float], RoundBudget] | None = None

    async def get(self, pair: Pair, *, client: str | None = None) -> PairRate:
        """The pair's rate; PairNotPriced (no provider lists it), ProvidersUnavailable, or
        OnDemandBudgetExceeded (a new round beyond the global or `client`'s budget)."""
        cached = self._cache.get(pair.code)
        if cached is not None and cached[0] > self._clock():
            return _result(cached[1])
        loop = asyncio.get_running_loop()
        key = (loop, pair.code)
        task = self._inflight.get(key)
        if task is None:
            # Only a new round is charged: a cached answer or a shared round costs nothing.
            self._round_budget().take(client)
            task = loop.create_task(self._lookup(pair), name=f"ondemand-{pair.code}")
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # Shielded: a client that disconnects must not cancel the round the others wait on.
        return await asyncio.shield(task)

    def clear(self) -> None:
        """Forget answers, listings and budgets (tests)."""
        self._cache.clear()
        self._budget = None
        for upstream in self._upstreams.values():
            upstream.listings.clear()

    async def aclose(self) -> None:
        """Close this event loop's HTTP client (server shutdown)."""
        upstream = self._upstreams.pop(asyncio.get_running_loop(), None)
        if upstream is not None:
            await upstream.client.aclose()

    def _round_budget(self) -> RoundBudget:
        rates = (float(settings.KURS_ONDEMAND_RATE), float(settings.KURS_ONDEMAND_CLIENT_RATE))
        if self._budget is None or self._budget[0] != rates:
            budget = RoundBudget(rate=rates[0], client_rate=rates[1], clock=self._clock)
            self._budget = (rates, budget)
        return self._budget[1]

    async def _lookup(self, pair: Pair) -> PairRate:
        result: PairRate | RatesError
        try:
            result = await self._resolve(pair)
            ttl = CACHE_SECONDS
        except PairNotPriced as exc:
            result, ttl = exc, CACHE_SECONDS
        except ProvidersUnavailable as exc:
            result, ttl = exc, FAILURE_CACHE_SECONDS
        self._remember(pair.code, result, ttl)
        return _result(result)

    def _remember(self, code: str, result: PairRate | RatesError, ttl: float) -> None:
        now = self._clock()
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache.pop(code, None)  # re-inserted last: the dict's order is the age order
        self._cache[code] = (now + ttl, result)

    def _upstream(self) -> _Upstream:
        loop = asyncio.get_running_loop()
        signature = (
            tuple(settings.KURS_PROVIDERS),
            repr(settings.KURS_PROVIDER_URLS),
            repr(settings.KURS_ASSET_ALIASES),
            settings.KURS_USD_PROXY,
            settings.KURS_COINGECKO_API_KEY,
        )
        upstream = self._upstreams.get(loop)
        if upstream is None:
            client = http_client(REQUEST_TIMEOUT)
            upstream = _Upstream(client, [], ())
            self._upstreams[loop] = upstream
        if upstream.signature != signature:
            upstream.providers = build_providers(settings.KURS_PROVIDERS, client=upstream.client)
            upstream.signature = signature
            upstream.listings.clear()
        return upstream

    async def _resolve(self, pair: Pair) -> PairRate:
        upstream = self._upstream()
        providers = upstream.providers
        deadline = asyncio.get_running_loop().time() + ROUND_SECONDS
        routes = derivation_routes(pair)
        wanted = list(dict.fromkeys([pair, *(leg for route in routes for leg, _ in route)]))
        found = await self._quote(upstream, wanted, deadline)
        if direct := found.quotes.get(pair.code):
            leg = direct[0]
            return PairRate(
                pair=pair.code,
                value=leg.value,
                provider=leg.provider,
                source_time=leg.source_time,
                fresh_until=leg.fresh_until,
                derived=False,
                failover=_outranked([leg], found.failed, providers),
                peg_power=int(leg.proxied),
            )
        for route in routes:
            derived = _derive(pair, route, found, providers)
            if derived is not None:
                return derived
        if found.failed:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in found.failed.items())
            raise ProvidersUnavailable(f"no provider could price {pair.code} now ({reasons})")
        raise PairNotPriced(f"no provider prices {pair.code}, directly or as a cross rate")

    async def _quote(self, upstream: _Upstream, pairs: Sequence[Pair], deadline: float) -> _Round:
        """Quotes for `pairs` from the listing of every provider that lists any of them."""
        asks = [
            (p, wanted)
            for p in upstream.providers
            if (wanted := [x for x in pairs if p.supports(x)])
        ]
        listings = await asyncio.gather(
            *(self._listing(upstream, provider, deadline) for provider, _ in asks)
        )
        found = _Round(quotes={}, failed={})
        now = timezone.now()
        for (provider, wanted), listing in zip(asks, listings, strict=True):
            if isinstance(listing, str):
                found.failed[provider.name] = listing
                continue
            try:
                quotes = listing.quotes(wanted)
            except ProviderError as exc:
                found.failed[provider.name] = str(exc)
                continue
            for quote in quotes:
                leg = _checked(quote, now=now)
                if isinstance(leg, str):
                    found.failed.setdefault(provider.name, f"{quote.pair} rejected: {leg}")
                else:
                    found.quotes.setdefault(quote.pair, []).append(leg)
        return found

    async def _listing(
        self, upstream: _Upstream, provider: Provider, deadline: float
    ) -> Listing | str:
        """The provider's listing, fetched again only when its interval has passed (one request
        for all askers); or why there is none."""
        slot = upstream.listings.setdefault(provider.name, _ListingSlot())
        if slot.task is None and slot.until <= self._clock():
            wait = weights.spare(provider.name, provider.listing_weight)
            if wait > 0:
                # The rest of the exchange's limit is the fetcher's; a listing still on hand
                # serves (validation rejects its quotes once they are too old).
                logger.info("on-demand: %s weight near its limit, not asked", provider.name)
                if slot.listing is not None and slot.error is None:
                    return slot.listing
                return f"request weight kept for tracked pairs, next try in {math.ceil(wait)}s"
            slot.task = asyncio.get_running_loop().create_task(
                self._refresh(provider, slot), name=f"ondemand-listing-{provider.name}"
            )
        if slot.task is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(slot.task)
            except TimeoutError:
                return f"no answer within {ROUND_SECONDS:g}s"
        if slot.error is not None or slot.listing is None:
            return slot.error or "no listing"
        return slot.listing

    async def _refresh(self, provider: Provider, slot: _ListingSlot) -> None:
        try:
            async with asyncio.timeout(ROUND_SECONDS):
                slot.listing, slot.error = await provider.listing(), None
        except ProviderError as exc:
            slot.error = str(exc)
        except TimeoutError:
            slot.error = f"no answer within {ROUND_SECONDS:g}s"
        except Exception as exc:
            # A bug in one provider's parsing must not cost the others (or answer 500).
            logger.exception("on-demand listing from %s failed", provider.name)
            slot.error = type(exc).__name__
        finally:
            # Failures wait as long as answers: a provider that is down is not asked more often.
            slot.until = self._clock() + listing_interval(provider)
            slot.task = None
        if slot.error is not None:
            logger.info("on-demand: %s listing failed: %s", provider.name, slot.error)


def _result(result: PairRate | RatesError) -> PairRate:
    if isinstance(result, RatesError):
        # A fresh exception per waiter: one instance raised in many tasks shares a traceback.
        raise type(result)(str(result))
    return result


def _checked(quote: Quote, *, now: datetime) -> Leg | str:
    """The quote as a Leg when it passes validation, else the rejection reason."""
    try:
        value = validation.checked_value(quote.value)
        validation.check_time(
            quote.source_time, now=now, freshness=policy.provider_freshness(quote.provider)
        )
    except validation.QuoteRejected as exc:
        logger.info(
            "on-demand: rejected %s quote for %s (%s): %s",
            quote.provider,
            quote.pair,
            exc.reason,
            exc.detail,
        )
        return exc.reason
    return Leg(
        pair=quote.pair,
        provider=quote.provider,
        value=value,
        source_time=quote.source_time,
        fresh_until=policy.fresh_until(quote.provider, quote.source_time),
        proxied=quote.proxied,
    )


def _derive(
    pair: Pair, route: Route, found: _Round, providers: Sequence[Provider]
) -> PairRate | None:
    legs: list[tuple[Leg, bool]] = []
    for leg_pair, inverted in route:
        quotes = found.quotes.get(leg_pair.code)
        if not quotes:
            return None
        legs.append((quotes[0], inverted))
    try:
        value = route_value(legs)
    except validation.QuoteRejected as exc:
        logger.info("on-demand: %s via %s does not fit: %s", pair.code, route, exc.detail)
        return None
    used = [leg for leg, _ in legs]
    return PairRate(
        pair=pair.code,
        value=value,
        provider=policy.DERIVED_SEPARATOR.join(leg.provider for leg in used),
        source_time=max(leg.source_time for leg in used),
        fresh_until=min(leg.fresh_until for leg in used),
        derived=True,
        failover=_outranked(used, found.failed, providers),
        route=tuple(used),
        peg_power=sum((-1 if inverted else 1) for leg, inverted in legs if leg.proxied),
    )


def _outranked(legs: Sequence[Leg], failed: dict[str, str], providers: Sequence[Provider]) -> bool:
    """Did a provider that lists one of the legs, and outranks the one that served it, fail?"""
    return any(
        provider.name in failed
        and provider.supports(Pair.parse(leg.pair))
        and policy.provider_priority(provider.name) < policy.provider_priority(leg.provider)
        for leg in legs
        for provider in providers
    )


on_demand = OnDemandRates()


@dataclass(frozen=True, slots=True)
class _TrackedIndex:
    """Active pairs by their canonical legs (aliases resolved), for one items generation."""

    key: tuple[int, str]
    by_legs: dict[tuple[str, str], tuple[str, ...]]


_tracked_index: _TrackedIndex | None = None


def _canonical(base: str, quote: str) -> tuple[str, str]:
    return policy.canonical_asset(base), policy.canonical_asset(quote)


def tracked_sources(pair: Pair) -> list[tuple[str, bool]]:
    """The tracked pairs that price `pair`, best first, each with whether it is inverted: the
    pair itself, its exact inverse, then its aliases as asked, then its aliases inverted
    (USDT-RUB ← USDTERC-RUB, USDTTRC-RUB; RUB-USDT ← the same, inverted)."""
    global _tracked_index
    key = (snapshot.items_generation, repr(settings.KURS_ASSET_ALIASES))
    index = _tracked_index
    if index is None or index.key != key:
        by_legs: dict[tuple[str, str], list[str]] = {}
        for code in sorted(snapshot.active_pairs()):
            tracked = Pair.parse(code)
            by_legs.setdefault(_canonical(tracked.base, tracked.quote), []).append(code)
        index = _TrackedIndex(key, {legs: tuple(codes) for legs, codes in by_legs.items()})
        _tracked_index = index
    legs = _canonical(pair.base, pair.quote)
    if legs[0] == legs[1]:
        # An identity (USDTTRC-USDT): only the pair itself, if tracked, answers for it.
        return [(pair.code, False)] if pair.code in index.by_legs.get(legs, ()) else []
    inverse = f"{pair.quote}-{pair.base}"
    found = [(code, False) for code in index.by_legs.get(legs, ())]
    found += [(code, True) for code in index.by_legs.get((legs[1], legs[0]), ())]
    # The pair itself first, then its exact inverse; the sort is stable.
    found.sort(key=lambda source: (source[0] != pair.code, source[0] != inverse))
    return found


async def _snapshot_ready() -> None:
    if not snapshot.loaded:
        try:
            await snapshot.aload()
        except DatabaseError:
            # The database is down: tracked pairs are then priced on demand like any other.
            logger.warning("rates snapshot not loaded (database unavailable)", exc_info=True)


def _from_tracked(pair: Pair, course: dict[str, Any], inverted: bool) -> dict[str, Any] | None:
    """`pair`'s answer from the course of the tracked pair that prices it; None when its
    inverse does not fit the stored precision. Inverted, bid and ask are the inverses of ask
    and bid, and buy and sell follow from them; `sources` still describe the tracked pair."""
    value, derived, route = course["value"], course["derived"], course["route"]
    evidence = {name: course[name] for name in EVIDENCE_FIELDS if name in course}
    if inverted:
        try:
            value = route_value([(_course_leg(course), True)])
            bid, ask = (_inverse(course["ask"]), _inverse(course["bid"]))
        except validation.QuoteRejected:
            return None
        # Inverted, it is derived; the legs are still shown as their providers quoted them.
        derived, route = True, route or [_course_leg(course).to_dict()]
        markup = snapshot.markup_of(course["direction"])
        buy, sell = with_markup(value, bid, ask, markup, places=validation.DECIMAL_PLACES)
        evidence.update(
            bid=bid, ask=ask, spread_bps=spread_bps(bid, ask, value), buy=buy, sell=sell
        )
    return {
        "pair": pair.code,
        "value": value,
        "provider": course["provider"],
        "source_time": course["source_time"],
        "age_s": course["age_s"],
        "derived": derived,
        "stale": course["stale"],
        "status": course["status"],
        "route": route,
        **evidence,
    }


def _inverse(value: Decimal | None) -> Decimal | None:
    if value is None:
        return None
    return route_value([(Leg("", "", value, _EPOCH, _EPOCH), True)])


def _course_leg(course: dict[str, Any]) -> Leg:
    return Leg(
        pair=course["direction"],
        provider=course["provider"],
        value=course["value"],
        source_time=course["source_time"],
        fresh_until=course["source_time"],  # not read: the course carries its own staleness
    )


async def _priced(
    pair: Pair, client: str | None, *, expand: bool = False
) -> tuple[dict[str, Any], Decimal | None]:
    """The pair's answer, and the tracked value to divide by when it is a tracked pair inverted
    (so that a conversion divides exactly instead of multiplying by a rounded inverse)."""
    await _snapshot_ready()
    for code, inverted in tracked_sources(pair):
        found = snapshot.courses([code], expand=expand)
        if not found:
            continue  # tracked but never quoted yet
        answer = _from_tracked(pair, found[0], inverted)
        if answer is not None:
            return answer, found[0]["value"] if inverted else None
    priced = await on_demand.get(pair, client=client)
    answer = priced.to_dict(timezone.now())
    if priced.peg_power:  # through the USD proxy: converted while its peg is broken
        answer = pegs.convert_answer(answer, priced.peg_power, await proxy_peg())
    return answer, None


async def _priced_at(
    pair: Pair, at: datetime, *, expand: bool
) -> tuple[dict[str, Any], Decimal | None]:
    """`_priced` at an instant (docs/api.md#point-in-time): from the served log of the tracked
    pair that prices it, judged then, with the version's fields (and, with `expand`, each
    provider's quote then); NotServedAt for a pair no tracked pair prices, or none served then."""
    await _snapshot_ready()
    missing: RatesError = NotServedAt(f"{pair.code} is not tracked: only tracked pairs are logged")
    for code, inverted in tracked_sources(pair):
        try:
            version = await servedlog.aversion_at(at, code=code)
        except NotServedAt as exc:
            missing = exc
            continue
        course = version.course(code)
        answer = _from_tracked(pair, course, inverted)
        if answer is None:
            continue
        answer.update(version.fields())
        if expand:
            answer["sources"] = await servedlog.asources_at(
                version.row.item_id, at, serving=version.row.provider
            )
        return answer, course["value"] if inverted else None
    servedlog.check_instant(at, now=timezone.now())  # a bad instant says so, tracked or not
    raise missing


async def pair_rate(
    pair: Pair, *, client: str | None = None, at: datetime | None = None, expand: bool = False
) -> dict[str, Any]:
    """`/rates/{base}/{quote}`: from the snapshot when the pair, its inverse or an alias is
    tracked, else on demand (`client`, the asker's address, is charged for a new round); at the
    instant `at` from the served log."""
    if at is not None:
        return (await _priced_at(pair, at, expand=expand))[0]
    return (await _priced(pair, client, expand=expand))[0]


async def convert(
    *,
    source: str,
    target: str,
    amount: Decimal,
    client: str | None = None,
    side: str = "mid",
    at: datetime | None = None,
    expand: bool = False,
) -> dict[str, Any]:
    """`/convert`: amount × the pair's rate at `side` (`mid`: the value, ÷ the tracked rate for
    an inverted tracked pair; `buy`/`sell`: the rate's `buy`/`sell`), exact, rounded once to
    RESULT_STEP (half even); at the instant `at` with the rate served then (the version's
    fields null when from = to)."""
    if source == target:
        if at is not None:
            servedlog.check_instant(at, now=timezone.now())
        identity = {
            "from": source,
            "to": target,
            "amount": amount,
            "side": side,
            "rate": Decimal(1),
            "result": amount,
            "provider": None,
            "source_time": None,
            "age_s": None,
            "derived": False,
            "stale": False,
            "status": policy.LIVE,
            "route": [],
            **EVIDENCE_DEFAULTS,
            "buy": None,
            "sell": None,
            **({"sources": []} if expand else {}),
        }
        return identity if at is None else {**identity, **dict.fromkeys(_SERVED_FIELDS)}
    pair = Pair(source, target)
    rate, divisor = await (
        _priced(pair, client, expand=expand) if at is None else _priced_at(pair, at, expand=expand)
    )
    if side != "mid":
        divisor = None
    factor = rate["value"] if side == "mid" else rate[side]
    with localcontext() as context:
        context.prec = _PRECISION
        exact = amount / divisor if divisor is not None else amount * factor
        result = exact.quantize(RESULT_STEP, rounding=ROUND_HALF_EVEN)
    return {
        **{name: rate[name] for name in EVIDENCE_FIELDS if name in rate},
        "from": source,
        "to": target,
        "amount": amount,
        "side": side,
        "rate": factor,
        "result": result,
        "provider": rate["provider"],
        "source_time": rate["source_time"],
        "age_s": rate["age_s"],
        "derived": rate["derived"],
        "stale": rate["stale"],
        "status": rate["status"],
        "route": rate["route"],
        **{name: rate[name] for name in _SERVED_FIELDS if name in rate},
    }
