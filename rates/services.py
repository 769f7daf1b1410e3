"""Rates writes: every quote goes through `accept_quote` (STYLE 1), once.

What happens to a quote (SPEC 4, 7, 9):

1. Validation (`rates.validation`): a finite positive number that fits the column, a source time
   not in the future (5 s of clock skew allowed) and not older than the provider's freshness
   window (`Provider.freshness`, else `KURS_STALE_AFTER`; cbr's daily rates get days, CoinGecko
   its 60 s cache plus margin), and no move of more than `KURS_MAX_JUMP` from the pair's last
   accepted value unless another provider's fresh quote (or a cross rate not built from the same
   provider) agrees within that limit. When no other provider has a fresh quote for the pair
   (it has a single source), the jump is accepted once that source has held the new level for
   `JUMP_HOLD` (5 minutes); while any other provider disagrees, it never is. A rejected quote
   is logged and counted with its reason, and withdraws that provider's earlier quote for the
   pair from serving.
2. Failover: the pair is served by the highest-priority (`KURS_PROVIDERS` order) provider whose
   latest accepted quote is still fresh and which is not down (its last REST round failed and it
   has no live stream). Direct quotes outrank cross rates.
3. History: an accepted quote of a tracked (active) item is stored as a Rate row when its value
   differs from the last row stored for that item and provider, or that row is 60 s old or more.
   Every provider's quotes are stored this way, serving or not, so the history shows what each
   exchange said; cross rates are stored only while they serve the pair (they are computed, not
   observed, and would otherwise double the writes of every leg).
4. Events: `rate.updated` is published, after commit, only for the provider that serves the pair,
   and only when the value or the serving provider changed or `KURS_STALE_AFTER / 2` passed since
   the last event for the pair (so readers can tell a still-fresh pair from a silent one). Clients
   therefore never flip between providers' slightly different prices; when the serving provider
   goes down or is rejected, the next one's latest accepted quote is published at once.

Cross rates (SPEC 4): a pair is also derived as `BASE-X × X-QUOTE` through X = USD, USDT and the
`KURS_USD_PROXY` asset when both legs are fresh, e.g. BTC-RUB = binance BTC-USD (the BTCUSDT
market) × cbr USD-RUB, named `binance+cbr` and marked `derived`. Legs need not be tracked items:
the fetch asks providers for them too, and the board keeps them in memory only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, localcontext
from functools import partial
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.utils import timezone

from items.models import Item
from rates import metrics, validation
from rates.board import DERIVED_SEPARATOR, Entry, QuoteBoard
from rates.models import Rate
from rates.providers import PROVIDER_CLASSES, Pair, Quote
from realtime import events

logger = logging.getLogger(__name__)

# SPEC 4: a rate is stored when its value changed or the last stored one is this old.
STORE_EVERY = timedelta(seconds=60)
# A jump no other provider can confirm or contradict (a pair with one source, e.g. USD-RUB from
# cbr) is accepted once that source has held the new level this long: a real crash must not
# freeze such a pair forever, while a glitch rarely repeats itself for minutes.
JUMP_HOLD = timedelta(minutes=5)
# Active items are re-read at most this often (and at once after an item event in this process).
ITEMS_TTL = 5.0

_board = QuoteBoard()


def get_board() -> QuoteBoard:
    """The process's quote board (tests and benchmarks swap `rates.services._board`)."""
    return _board


def _forget_items_on_item_event(subject: str, envelope: dict[str, Any]) -> None:
    if str(envelope.get("type", "")).startswith("item."):
        _board.forget_items()


events.add_transport(_forget_items_on_item_event)


@dataclass
class Acceptance:
    """What became of one quote; `derived` holds the cross rates it updated."""

    quote: Quote
    accepted: bool
    reason: str | None = None
    stored: bool = False
    published: bool = False
    derived: list[Acceptance] = field(default_factory=list)

    @property
    def stored_count(self) -> int:
        return int(self.stored) + sum(result.stored_count for result in self.derived)


# --- Providers: priority and freshness ---------------------------------------------------------
def provider_priority(name: str) -> tuple[int, ...]:
    """(0, index in KURS_PROVIDERS) for a provider; (1, leg, leg) for a cross rate."""
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
    return settings.KURS_STALE_AFTER


# --- Items and cross-rate routes ---------------------------------------------------------------
def _canonical(asset: str) -> str:
    return settings.KURS_ASSET_ALIASES.get(asset, asset)


def cross_routes(pair: Pair) -> list[tuple[Pair, Pair]]:
    """The (BASE-X, X-QUOTE) legs a pair can be derived from: X is USD, USDT and the USD proxy.

    With `KURS_USD_PROXY` empty, BTC-USD thus comes from a true USD quote or from
    BTC-USDT × USDT-USD (SPEC 3).
    """
    vias = dict.fromkeys(["USD", "USDT", settings.KURS_USD_PROXY or "USD"])
    assets = {_canonical(pair.base), _canonical(pair.quote)}
    return [(Pair(pair.base, via), Pair(via, pair.quote)) for via in vias if via not in assets]


def active_items(*, board: QuoteBoard | None = None) -> dict[str, int]:
    """code -> id of the active items, cached on the board for ITEMS_TTL seconds."""
    board = board or _board
    loaded = board.items_loaded_at
    if loaded is None or time.monotonic() - loaded > ITEMS_TTL:
        board.set_items(Item.objects.filter(is_active=True).values_list("code", "id"))
    return board.items


def wanted_pairs(item_codes: Iterable[str]) -> list[Pair]:
    """The tracked pairs and every cross-rate leg they need, each once, items first."""
    pairs: dict[Pair, None] = {}
    items = [Pair.parse(code) for code in item_codes]
    for pair in items:
        pairs[pair] = None
    for pair in items:
        for first, second in cross_routes(pair):
            pairs[first] = None
            pairs[second] = None
    return list(pairs)


def _dependants(leg: str, item_codes: Iterable[str]) -> list[tuple[str, Pair, Pair]]:
    found = []
    for code in item_codes:
        for first, second in cross_routes(Pair.parse(code)):
            if leg in (first.code, second.code):
                found.append((code, first, second))
    return found


# --- accept_quote ------------------------------------------------------------------------------
def accept_quote(
    quote: Quote, *, now: datetime | None = None, board: QuoteBoard | None = None
) -> Acceptance:
    """Validate, store and publish one provider quote, then the cross rates it moves.

    Sync (it writes in a transaction); async callers use `sync_to_async(accept_quote)`.
    """
    board = board or _board
    now = now or timezone.now()
    result = _accept(quote, derived=False, fresh_until=None, now=now, board=board)
    if result.accepted:
        for cross, fresh_until in _cross_quotes(quote.pair, now=now, board=board):
            result.derived.append(
                _accept(cross, derived=True, fresh_until=fresh_until, now=now, board=board)
            )
    return result


def accept_quotes(quotes: Iterable[Quote], *, board: QuoteBoard | None = None) -> list[Acceptance]:
    """`accept_quote` for each quote of a REST round; one failing quote spares the others."""
    results = []
    for quote in quotes:
        try:
            results.append(accept_quote(quote, board=board))
        except Exception:
            # A database outage or a bug: log it with the quote, keep the round going.
            logger.exception("cannot accept %s quote for %s", quote.provider, quote.pair)
            results.append(Acceptance(quote, accepted=False, reason="error"))
    return results


def _accept(
    quote: Quote,
    *,
    derived: bool,
    fresh_until: datetime | None,
    now: datetime,
    board: QuoteBoard,
) -> Acceptance:
    name, pair = quote.provider, quote.pair
    if fresh_until is None:
        freshness = provider_freshness(name)
        fresh_until = quote.source_time + timedelta(seconds=freshness)
    else:
        freshness = (fresh_until - quote.source_time).total_seconds()
    try:
        value = validation.checked_value(quote.value)
        validation.check_time(quote.source_time, now=now, freshness=freshness)
    except validation.QuoteRejected as exc:
        return _reject(quote, exc, now=now, board=board)
    entry = Entry(
        provider=name,
        value=value,
        source_time=quote.source_time,
        fresh_until=fresh_until,
        priority=provider_priority(name),
        bid=validation.optional_value(quote.bid),
        ask=validation.optional_value(quote.ask),
        derived=derived,
        proxied=quote.proxied,
    )
    board.offer(pair, entry)
    item_id = active_items(board=board).get(pair)
    confirmations = board.confirmations(pair, entry, now=now)
    max_jump = settings.KURS_MAX_JUMP
    try:
        validation.check_jump(
            value,
            reference=_reference(pair, item_id, board=board),
            confirmations=confirmations,
            max_jump=max_jump,
        )
    except validation.QuoteRejected as exc:
        if confirmations or not board.held(pair, entry, now=now, hold=JUMP_HOLD, max_jump=max_jump):
            return _reject(quote, exc, now=now, board=board)
        logger.warning(
            "accepting %s's new level for %s: the only source held it for %ss (%s)",
            name,
            pair,
            JUMP_HOLD.total_seconds(),
            exc.detail,
        )
    board.accept(pair, entry)
    metrics.QUOTES_ACCEPTED.labels(name).inc()
    if item_id is None:
        return Acceptance(quote, accepted=True)
    metrics.RATE_AGE.labels(pair).set(max(0.0, (now - quote.source_time).total_seconds()))
    best = board.best(pair, now=now)
    serving = best is not None and best.provider == name
    publish = serving and board.should_publish(pair, entry, heartbeat=_heartbeat())
    stored = False
    if serving or not derived:
        try:
            stored = _store(item_id, entry, now=now)
        except DatabaseError:
            # The quote is still valid and still served; only its history row is lost. A broken
            # connection is dropped so that the next quote reconnects (streams never pause).
            logger.exception("cannot store the %s rate of %s", name, pair)
            close_old_connections()
    if publish:
        board.mark_published(pair, entry)
        transaction.on_commit(partial(events.publish, "rate.updated", rate_event(pair, entry)))
    return Acceptance(quote, accepted=True, stored=stored, published=publish)


def _heartbeat() -> float:
    return settings.KURS_STALE_AFTER / 2


def _reference(pair: str, item_id: int | None, *, board: QuoteBoard) -> Decimal | None:
    """The jump guard's reference: the pair's last accepted value (memory, else the database)."""
    reference = board.reference(pair)
    if reference is None and item_id is not None and board.seed_once(pair):
        last = (
            Rate.objects.filter(item_id=item_id)
            .order_by("-received_at", "-id")
            .values_list("value", flat=True)
            .first()
        )
        if last is not None:
            board.set_reference(pair, last)
            reference = last
    return reference


@transaction.atomic
def _store(item_id: int, entry: Entry, *, now: datetime) -> bool:
    last = (
        Rate.objects.filter(item_id=item_id, provider=entry.provider)
        .order_by("-received_at", "-id")
        .values_list("value", "received_at")
        .first()
    )
    if last is not None and last[0] == entry.value and now - last[1] < STORE_EVERY:
        return False
    Rate.objects.create(
        item_id=item_id,
        provider=entry.provider,
        value=entry.value,
        bid=entry.bid,
        ask=entry.ask,
        source_time=entry.source_time,
        received_at=now,
        derived=entry.derived,
    )
    metrics.RATES_STORED.labels(entry.provider).inc()
    return True


def _reject(
    quote: Quote, rejection: validation.QuoteRejected, *, now: datetime, board: QuoteBoard
) -> Acceptance:
    metrics.QUOTES_REJECTED.labels(quote.provider, rejection.reason).inc()
    logger.warning(
        "rejected %s quote for %s (%s): %s",
        quote.provider,
        quote.pair,
        rejection.reason,
        rejection.detail,
    )
    # What the provider says now is wrong, so its earlier quote no longer speaks for the pair.
    # A stale quote is only late (a replayed or slow frame): its fresher one still stands.
    if rejection.reason != "stale" and board.withdraw(quote.pair, quote.provider):
        _publish_failover(quote.pair, now=now, board=board)
    return Acceptance(quote, accepted=False, reason=rejection.reason)


def _cross_quotes(leg: str, *, now: datetime, board: QuoteBoard) -> list[tuple[Quote, datetime]]:
    """Cross rates of tracked items that use `leg`, from the best fresh direct quote of each leg."""
    crosses = []
    for code, first, second in _dependants(leg, active_items(board=board)):
        one = board.best(first.code, now=now, direct_only=True)
        two = board.best(second.code, now=now, direct_only=True)
        if one is None or two is None:
            continue
        with localcontext() as context:
            context.prec = 80  # exact product of two 38-digit decimals; rounded once on store
            value = one.value * two.value
        crosses.append(
            (
                Quote(
                    provider=f"{one.provider}{DERIVED_SEPARATOR}{two.provider}",
                    pair=code,
                    value=value,
                    source_time=max(one.source_time, two.source_time),
                    proxied=one.proxied or two.proxied,
                ),
                min(one.fresh_until, two.fresh_until),
            )
        )
    return crosses


# --- Failover when a provider goes down ------------------------------------------------------
def rate_event(pair: str, entry: Entry) -> dict[str, Any]:
    """`rate.updated` data (SPEC 7)."""
    return {
        "direction": pair,
        "value": entry.value,
        "provider": entry.provider,
        "source_time": entry.source_time.isoformat().replace("+00:00", "Z"),
        "derived": entry.derived,
    }


def _publish_failover(pair: str, *, now: datetime, board: QuoteBoard) -> None:
    if pair not in board.published:
        return
    best = board.best(pair, now=now)
    if best is not None and board.should_publish(pair, best, heartbeat=_heartbeat()):
        board.mark_published(pair, best)
        events.publish("rate.updated", rate_event(pair, best))


def provider_set_down(name: str, down: bool, *, board: QuoteBoard | None = None) -> None:
    """A provider stopped (or resumed) answering: its fresh quotes stop (or resume) serving.

    Either way the pairs it touches are re-evaluated at once: going down republishes the next
    provider's latest quote for every pair it served; coming back republishes its own fresh
    quotes for the pairs it outranks the current server on.
    """
    board = board or _board
    if not board.set_down(name, down):
        return
    if down:
        logger.warning("%s is down: failing over the pairs it served", name)
    now = timezone.now()
    for pair in list(board.published):
        _publish_failover(pair, now=now, board=board)


# --- History retention -------------------------------------------------------------------------
def prune_history(*, days: int | None = None) -> int:
    """Delete Rate rows received more than `days` (KURS_HISTORY_DAYS) ago; returns how many."""
    days = settings.KURS_HISTORY_DAYS if days is None else days
    cutoff = timezone.now() - timedelta(days=days)
    deleted, _ = Rate.objects.filter(received_at__lt=cutoff).delete()
    logger.info("pruned %d rates received before %s", deleted, cutoff.isoformat())
    return deleted
