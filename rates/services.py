"""Rates writes: every quote goes through `accept_quote`, once, on the live owner.

One quote, one straight path (docs/architecture.md#the-quote-pipeline), each step a function below:

1. `_validate` (a value or a reason): a finite positive number that fits the column, a source time
   not in the future (5 s of clock skew allowed) and not older than the provider's freshness
   window (`rates.policy.provider_freshness`), and no move of more than `KURS_MAX_JUMP` from the
   pair's last accepted value unless another provider's fresh quote (or a cross rate not built
   from the same provider) agrees within that limit. When no other provider has a fresh quote for
   the pair, the jump is accepted once that source has held the new level for `JUMP_HOLD`
   (5 minutes); while any other provider disagrees, it never is. A rejected quote is logged and
   counted with its reason, and withdraws that provider's earlier quote from serving.
2. `_decide` (the board, pure given its state): the pair is served by the highest-priority
   provider whose latest accepted quote is still fresh and which is not down; direct quotes
   outrank cross rates. The answer is the pair's new current rate when it is news: another value
   or provider, another status (live/failover/stale), or a confirmation (`checked_at` moved) once
   `KURS_STALE_AFTER / 2` has passed since the last write (the heartbeat of
   docs/rates.md#events). A new pair (an item created or activated again) is in its first round
   until every provider that can quote it has answered or failed once: meanwhile only a `live`
   answer is news, so its first published status is the true one, and a pair never served
   counts no failover.
3. `_persist` (one transaction): the history row when due (an accepted quote of a tracked item
   whose value differs from the last row of that item and provider, or whose last row is 60 s
   old; every provider's quotes are kept, cross rates only while they serve) and the
   `CurrentRate` row, with `version` + 1.
4. `publish_on_commit`: `rate.updated` with the new current rate, after the commit.

Only a board whose `guard` allows it (the owner's lease) persists and publishes: a process that
does not own live state may quote (the one-shot `run_fetch` table) but never writes.

Cross rates (docs/rates.md#aliases-the-usd-proxy-and-cross-rates): a pair is also derived as
`BASE-X × X-QUOTE` through X = USD, USDT and the `KURS_USD_PROXY` asset when both legs are
fresh, e.g. BTC-RUB = binance BTC-USD (the BTCUSDT market) × cbr USD-RUB, named `binance+cbr`
and marked `derived`, with its legs as `route`. Legs need not be tracked items: the fetch asks
providers for them too, and the board keeps them in memory only. Cross rates are new quotes
entering the same path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import localcontext
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections, transaction
from django.utils import timezone

from items.models import Item
from rates import metrics, policy, servedlog, validation
from rates.board import Current, Entry, QuoteBoard
from rates.models import CURRENT_FIELDS, CurrentRate, Rate
from rates.providers import Pair, Quote
from rates.snapshot import route_from_db
from realtime import events

logger = logging.getLogger(__name__)

# docs/rates.md#history: a rate is stored when its value changed or the last stored one is this old.
STORE_EVERY = timedelta(seconds=60)
# A jump no other provider can confirm or contradict (a pair with one source, e.g. USD-RUB from
# cbr) is accepted once that source has held the new level this long: a real crash must not
# freeze such a pair forever, while a glitch rarely repeats itself for minutes.
JUMP_HOLD = timedelta(minutes=5)
# Active items are re-read at most this often.
ITEMS_TTL = 5.0

_board = QuoteBoard()


def get_board() -> QuoteBoard:
    """The process's quote board (tests and benchmarks swap `rates.services._board`)."""
    return _board


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


@dataclass(frozen=True)
class CrossQuote:
    """A cross rate computed from two legs' best direct quotes."""

    quote: Quote
    fresh_until: datetime
    route: tuple[dict[str, Any], ...]


# --- Items and cross-rate routes ---------------------------------------------------------------
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
        for first, second in policy.cross_routes(pair):
            pairs[first] = None
            pairs[second] = None
    return list(pairs)


def _dependants(leg: str, item_codes: Iterable[str]) -> list[tuple[str, Pair, Pair]]:
    found = []
    for code in item_codes:
        for first, second in policy.cross_routes(Pair.parse(code)):
            if leg in (first.code, second.code):
                found.append((code, first, second))
    return found


# --- Ownership: the board starts from the read model --------------------------------------------
def current_from_row(row: CurrentRate) -> Current:
    fields = {name: getattr(row, name) for name in CURRENT_FIELDS}
    return Current(**fields, route=tuple(route_from_db(row.route)))


def board_load(*, board: QuoteBoard | None = None) -> int:
    """A new owner's start: forget this process's view, load every stored current rate."""
    board = board or _board
    rows = CurrentRate.objects.select_related("item").filter(item__is_active=True)
    loaded = [(row.item.code, current_from_row(row)) for row in rows]
    board.clear()
    board.load(loaded)
    for pair, current in loaded:  # the owner's gauges from its first moment, not its first write
        _export_current(pair, current)
    return len(loaded)


def adopt_stored(codes: Iterable[str], *, board: QuoteBoard | None = None) -> None:
    """Pairs that became active after the owner loaded (an item activated again): the stored
    current rate of each the board lacks, so that its next write continues the `version`
    readers already hold (the web snapshot keeps an inactive pair's last course)."""
    board = board or _board
    missing = [code for code in codes if board.get_current(code) is None]
    if not missing:
        return
    for row in CurrentRate.objects.select_related("item").filter(item__code__in=missing):
        board.adopt_current(row.item.code, current_from_row(row))


# --- accept_quote ------------------------------------------------------------------------------
def accept_quote(
    quote: Quote, *, now: datetime | None = None, board: QuoteBoard | None = None
) -> Acceptance:
    """Validate, decide, store and publish one provider quote, then the cross rates it moves.

    Sync (it writes in a transaction); async callers use `sync_to_async(accept_quote)`.
    """
    board = board or _board
    now = now or timezone.now()
    result = _accept(quote, cross=None, now=now, board=board)
    if result.accepted:
        for cross in _cross_quotes(quote.pair, now=now, board=board):
            result.derived.append(_accept(cross.quote, cross=cross, now=now, board=board))
    return result


def accept_quotes(quotes: Iterable[Quote], *, board: QuoteBoard | None = None) -> list[Acceptance]:
    """`accept_quote` for each quote of a REST round; one failing quote spares the others."""
    results = []
    for quote in quotes:
        try:
            results.append(accept_quote(quote, board=board))
        except Exception:
            # A bug: log it with the quote, keep the round going.
            logger.exception("cannot accept %s quote for %s", quote.provider, quote.pair)
            results.append(Acceptance(quote, accepted=False, reason="error"))
    return results


def _accept(
    quote: Quote, *, cross: CrossQuote | None, now: datetime, board: QuoteBoard
) -> Acceptance:
    try:
        entry = _validate(quote, cross=cross, now=now, board=board)
    except validation.QuoteRejected as exc:
        return _reject(quote, exc, now=now, board=board)
    board.accept(quote.pair, entry)
    metrics.QUOTES_ACCEPTED.labels(entry.provider).inc()
    item_id = active_items(board=board).get(quote.pair)
    if item_id is None:
        return Acceptance(quote, accepted=True)
    metrics.RATE_AGE.labels(quote.pair).set(max(0.0, (now - entry.source_time).total_seconds()))
    current = _decide(quote.pair, now=now, board=board)
    # Cross rates are computed, not observed: they are history only while they serve.
    serving_cross = entry.derived and board.best(quote.pair, now=now) == entry
    history = entry if not entry.derived or serving_cross else None
    stored = _persist(item_id, quote.pair, history, current, now=now, board=board)
    return Acceptance(quote, accepted=True, stored=stored, published=current is not None)


def _validate(quote: Quote, *, cross: CrossQuote | None, now: datetime, board: QuoteBoard) -> Entry:
    """The quote as a board entry, or QuoteRejected (the jump guard consults the board)."""
    name, pair = quote.provider, quote.pair
    fresh_until = cross.fresh_until if cross else policy.fresh_until(name, quote.source_time)
    value = validation.checked_value(quote.value)
    validation.check_time(
        quote.source_time, now=now, freshness=(fresh_until - quote.source_time).total_seconds()
    )
    entry = Entry(
        provider=name,
        value=value,
        source_time=quote.source_time,
        fresh_until=fresh_until,
        priority=policy.provider_priority(name),
        bid=validation.optional_value(quote.bid),
        ask=validation.optional_value(quote.ask),
        derived=cross is not None,
        proxied=quote.proxied,
        route=cross.route if cross else (),
    )
    board.offer(pair, entry)
    confirmations = board.confirmations(pair, entry, now=now)
    max_jump = settings.KURS_MAX_JUMP
    try:
        validation.check_jump(
            value, reference=board.reference(pair), confirmations=confirmations, max_jump=max_jump
        )
    except validation.QuoteRejected as exc:
        if confirmations or not board.held(pair, entry, now=now, hold=JUMP_HOLD, max_jump=max_jump):
            raise
        logger.warning(
            "accepting %s's new level for %s: the only source held it for %ss (%s)",
            name,
            pair,
            JUMP_HOLD.total_seconds(),
            exc.detail,
        )
    return entry


def _decide(pair: str, *, now: datetime, board: QuoteBoard) -> Current | None:
    """The pair's new current rate when there is news to write and publish, else None."""
    best = board.best(pair, now=now)
    current = board.get_current(pair)
    if best is None:
        # No fresh source: keep the last value, and say so once (a new pair's first round
        # first, which may yet bring one).
        if current is None or current.status == policy.STALE or board.awaits_better(pair, None):
            return None
        return replace(current, status=policy.STALE, version=current.version + 1)
    status = policy.serving_status(best.priority, board.expected_priority(pair))
    if status != policy.LIVE and board.awaits_better(pair, best.priority):
        # A new pair's first round: a provider that outranks `best` has not answered yet, and
        # its answer, not the first to arrive, makes the pair's first status.
        return None
    if current is not None and current.same_rate(best):
        checked_at = max(current.checked_at, best.checked_at)
        confirmed = checked_at > current.checked_at
        heartbeat_due = time.monotonic() - current.written >= policy.heartbeat_seconds()
        if status == current.status and not (confirmed and heartbeat_due):
            return None
        return replace(
            current,
            bid=best.bid,
            ask=best.ask,
            checked_at=checked_at,
            route=best.route,
            status=status,
            version=current.version + 1,
        )
    return Current(
        provider=best.provider,
        value=best.value,
        bid=best.bid,
        ask=best.ask,
        source_time=best.source_time,
        checked_at=best.checked_at,
        received_at=now,
        derived=best.derived,
        route=best.route,
        status=status,
        version=(current.version if current else 0) + 1,
    )


def _persist(
    item_id: int,
    pair: str,
    history: Entry | None,
    current: Current | None,
    *,
    now: datetime,
    board: QuoteBoard,
) -> bool:
    """One transaction: the history rows when due, the CurrentRate row; the event on commit.

    The entry that serves the new current rate is stored with it when due, whichever quote led
    to the decision: a quote whose own write failed earlier (a terminated connection) and is
    decided again with another provider's quote, or a cross rate that starts serving on a tick,
    so that no current rate is ever without its history row.

    Returns whether a history row was written. The board learns the new current rate only once
    it is committed, so a failed write is simply decided again with the next quote.
    """
    subject = current or history  # the rate a failure is reported under
    if subject is None or not board.writable():
        return False
    entries = [history] if history is not None else []
    if current is not None:
        serving = board.best(pair, now=now)
        if serving is not None and serving not in entries and current.same_rate(serving):
            entries.append(serving)
    try:
        with transaction.atomic():
            stored = False
            for entry in entries:
                stored = _store_history(item_id, pair, entry, now=now, board=board) or stored
            if current is not None:
                _write_current(item_id, current)
                events.publish_on_commit("rate.updated", rate_event(pair, current))
    except IntegrityError:
        # The item was deleted while a quote for it was in flight: a normal race, not a fault.
        logger.warning("%s was deleted while being quoted; its rate is dropped", pair)
        board.forget_items()
        board.drop_current(pair)
        return False
    except DatabaseError as exc:
        # The quote is still valid and still served; a broken connection is dropped so that
        # the next quote reconnects (streams never pause). A history row written before the
        # failure was rolled back with it: forget it, or the next write of the same value
        # would skip its row and leave a current rate without history.
        for entry in entries:
            board.last_stored.pop((pair, entry.provider), None)
        logger.error("cannot store the %s rate of %s: %s", subject.provider, pair, exc)
        close_old_connections()
        return False
    if current is not None:
        _observe_current(pair, board.get_current(pair), current)
        board.set_current(pair, current)
    return stored


def _export_current(pair: str, current: Current) -> None:
    """The pair's status and last-confirmation gauges."""
    metrics.RATE_STATUS.labels(pair).set(metrics.STATUS_VALUES[current.status])
    metrics.RATE_CHECKED.labels(pair).set(current.checked_at.timestamp())


def _observe_current(pair: str, previous: Current | None, current: Current) -> None:
    """The pair's gauges, and a failover each time another provider takes over (a pair never
    served before has nothing to fail over from, whatever its first status)."""
    _export_current(pair, current)
    if (
        current.status == policy.FAILOVER
        and previous is not None
        and (previous.status != policy.FAILOVER or previous.provider != current.provider)
    ):
        metrics.FAILOVERS.labels(pair, current.provider).inc()


def _store_history(
    item_id: int, pair: str, entry: Entry, *, now: datetime, board: QuoteBoard
) -> bool:
    key = (pair, entry.provider)
    last = board.last_stored.get(key)
    if last is None:  # once per pair and provider per owner: later rows are remembered
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
    # Remembered at once; `_persist` forgets it again when the transaction fails.
    board.last_stored[key] = (entry.value, now)
    metrics.RATES_STORED.labels(entry.provider).inc()
    return True


def _write_current(item_id: int, current: Current) -> None:
    fields = {name: getattr(current, name) for name in CURRENT_FIELDS}
    fields["route"] = _route_to_db(current.route)
    # One UPDATE in the common case (the row exists), an INSERT for a pair's first rate.
    if not CurrentRate.objects.filter(item_id=item_id).update(**fields):
        CurrentRate.objects.create(item_id=item_id, **fields)
    servedlog.record(item_id, fields)  # the same transaction: the log is what was served


def _route_to_db(route: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "pair": leg["pair"],
            "provider": leg["provider"],
            "value": format(leg["value"], "f"),
            "source_time": leg["source_time"].isoformat(),
        }
        for leg in route
    ]


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
        extra={"provider": quote.provider, "pair": quote.pair},
    )
    # What the provider says now is wrong, so its earlier quote no longer speaks for the pair.
    # A stale quote is only late (a replayed or slow frame): its fresher one still stands.
    if rejection.reason != "stale" and board.withdraw(quote.pair, quote.provider):
        reevaluate(pairs=[quote.pair], now=now, board=board)
    return Acceptance(quote, accepted=False, reason=rejection.reason)


def _cross_quotes(leg: str, *, now: datetime, board: QuoteBoard) -> list[CrossQuote]:
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
        quote = Quote(
            provider=f"{one.provider}{policy.DERIVED_SEPARATOR}{two.provider}",
            pair=code,
            value=value,
            source_time=max(one.source_time, two.source_time),
            proxied=one.proxied or two.proxied,
        )
        route = tuple(
            {"pair": leg_pair.code, "provider": e.provider, "value": e.value, "source_time": t}
            for leg_pair, e, t in ((first, one, one.source_time), (second, two, two.source_time))
        )
        crosses.append(CrossQuote(quote, min(one.fresh_until, two.fresh_until), route))
    return crosses


# --- Re-evaluation: time passing, providers going down ------------------------------------------
def rate_event(pair: str, current: Current) -> dict[str, Any]:
    """`rate.updated` data (docs/events.md#envelope-and-event-types); the JSON encoder formats
    the times."""
    return {
        "direction": pair,
        "value": current.value,
        "provider": current.provider,
        "source_time": current.source_time,
        "checked_at": current.checked_at,
        "status": current.status,
        "derived": current.derived,
        "route": list(current.route),
        "version": current.version,
    }


def reevaluate(
    *,
    pairs: Iterable[str] | None = None,
    now: datetime | None = None,
    board: QuoteBoard | None = None,
) -> int:
    """Decide every (or the given) pair again without a new quote; returns how many changed.

    Time alone changes who serves: a quote outlives its freshness window, so the next provider
    (or `stale`) must show without waiting for another quote. The owner calls this every second.
    """
    board = board or _board
    now = now or timezone.now()
    items = active_items(board=board)
    changed = 0
    for pair in list(pairs) if pairs is not None else board.pairs():
        item_id = items.get(pair)
        if item_id is None:
            continue
        current = _decide(pair, now=now, board=board)
        if current is not None:
            _persist(item_id, pair, None, current, now=now, board=board)
            changed += 1
    return changed


def provider_set_down(name: str, down: bool, *, board: QuoteBoard | None = None) -> bool:
    """A provider stopped (or resumed) answering: its fresh quotes stop (or resume) serving.

    Only the board's flag changes here (callable from the event loop); the owner decides the
    pairs again with `reevaluate` right after (the failed round, or its next tick), which fails
    the pairs over to the next provider, or lets a recovered one serve where it outranks.
    """
    board = board or _board
    changed = board.set_down(name, down)
    if changed and down and board.writable():
        # Only an owner fails pairs over (a read-only cycle, `run_fetch` beside a live owner,
        # stores nothing). INFO: the provider's failure itself was the warning.
        logger.info("%s is down: failing over the pairs it served", name)
    return changed


# --- History retention -------------------------------------------------------------------------
def prune_history(*, days: int | None = None) -> int:
    """Delete Rate rows received more than `days` (KURS_HISTORY_DAYS) ago, and the served
    versions no instant since then needs (`rates.servedlog.prune`); returns how many rates."""
    days = settings.KURS_HISTORY_DAYS if days is None else days
    cutoff = timezone.now() - timedelta(days=days)
    deleted, _ = Rate.objects.filter(received_at__lt=cutoff).delete()
    served = servedlog.prune(cutoff)
    logger.info(
        "pruned %d rates and %d served versions before %s", deleted, served, cutoff.isoformat()
    )
    return deleted
