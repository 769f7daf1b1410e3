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
3. `Writes.add`: the history row when due (an accepted quote of a tracked item whose value
   differs from the last row of that item and provider, or whose last row is 60 s old; every
   provider's quotes are kept, cross rates only while they serve) and the `CurrentRate` row,
   with `version` + 1, its served version and its `rate.updated` outbox row; `Writes.flush`
   writes a burst of such decisions (the quotes the streams delivered meanwhile: `accept_quotes`)
   in one transaction.
4. `publish_all_on_commit`: `rate.updated` with each new current rate, after the commit.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import localcontext
from typing import Any

from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    IntegrityError,
    close_old_connections,
    connections,
    transaction,
)
from django.utils import timezone

from items.models import Item
from rates import consensus, metrics, peg_monitor, pegs, policy, servedlog, validation
from rates.board import Current, Entry, PairState, QuoteBoard
from rates.models import CURRENT_FIELDS, CURRENT_ROWS, RATE_ROWS, CurrentRate, Rate
from rates.providers import Pair, Quote
from rates.snapshot import route_from_db, sources_from_db, sources_to_db
from realtime import events

logger = logging.getLogger(__name__)

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
        board.set_items(Item.objects.filter(is_active=True).values_list("code", "id", "pricing"))
    return board.items


def wanted_pairs(
    item_codes: Iterable[str], *, quotable: Callable[[Pair], bool] | None = None
) -> list[Pair]:
    """The tracked pairs and the cross-rate legs they need, each once, items first.

    With `quotable` (can a provider quote this pair directly?), a route is needed only when
    both its legs can be quoted: SYN-USD, the USD leg of SYN-USDT, is not asked for (nor
    accepted) where no provider quotes USD-USDT (docs/scaling.md#the-owner).
    """
    pairs: dict[Pair, None] = {}
    items = [Pair.parse(code) for code in item_codes]
    for pair in items:
        pairs[pair] = None
    for pair in items:
        for first, second in policy.cross_routes(pair):
            if quotable is None or (quotable(first) and quotable(second)):
                pairs[first] = None
                pairs[second] = None
    return list(pairs)


def _dependants(leg: str, board: QuoteBoard) -> list[tuple[str, Pair, Pair]]:
    """The cross routes of active items that use `leg`, in item order: from an index the board
    keeps until its items (or the USD proxy) change, not a scan of every item per quote
    (docs/scaling.md#the-owner)."""
    proxy = settings.KURS_USD_PROXY
    built = board.routes_by_leg
    if built is None or built[0] != proxy:
        index: dict[str, list[tuple[str, Pair, Pair]]] = {}
        for code in list(board.items):
            for first, second in policy.cross_routes(Pair.parse(code)):
                for one in dict.fromkeys((first.code, second.code)):
                    index.setdefault(one, []).append((code, first, second))
        built = board.routes_by_leg = (proxy, index)
    return built[1].get(leg, [])


# --- Ownership: the board starts from the read model --------------------------------------------
def current_from_row(row: CurrentRate) -> Current:
    fields = {name: getattr(row, name) for name in CURRENT_FIELDS}
    return Current(
        **fields, route=tuple(route_from_db(row.route)), sources=sources_from_db(row.sources)
    )


def board_load(*, board: QuoteBoard | None = None) -> int:
    """A new owner's start: forget this process's view, load every stored current rate."""
    board = board or _board
    rows = CurrentRate.objects.select_related("item").filter(item__is_active=True)
    loaded = [(row.item.code, current_from_row(row)) for row in rows if board.owned(row.item.code)]
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
    active_items(board=board)  # the items (and their pricing) are current for what follows
    writes = Writes(board)
    result = _accept_quote(quote, now=now, board=board, writes=writes)
    writes.flush()
    return result


def accept_quotes(quotes: Iterable[Quote], *, board: QuoteBoard | None = None) -> list[Acceptance]:
    """`accept_quote` for a burst of quotes (what the streams delivered meanwhile, a REST
    round): each decided in turn, all their rows written in one transaction (`Writes`); one
    failing quote (a bug) spares the others."""
    board = board or _board
    now = timezone.now()
    active_items(board=board)
    writes = Writes(board)
    results = []
    for quote in quotes:
        try:
            results.append(_accept_quote(quote, now=now, board=board, writes=writes))
        except Exception:
            # A bug: log it with the quote, keep the burst going.
            logger.exception("cannot accept %s quote for %s", quote.provider, quote.pair)
            results.append(Acceptance(quote, accepted=False, reason="error"))
    writes.flush()
    return results


def _accept_quote(quote: Quote, *, now: datetime, board: QuoteBoard, writes: Writes) -> Acceptance:
    result, state = _accept(quote, cross=None, now=now, board=board, writes=writes)
    if state is not None:
        for cross in _cross_quotes(quote.pair, state, now=now, board=board):
            derived, _ = _accept(cross.quote, cross=cross, now=now, board=board, writes=writes)
            result.derived.append(derived)
    return result


def _accept(
    quote: Quote, *, cross: CrossQuote | None, now: datetime, board: QuoteBoard, writes: Writes
) -> tuple[Acceptance, PairState | None]:
    """One quote through validate, decide and persist; with the pair's state as decided (the
    cross-rate step reads its best direct entry from it, not from the board again)."""
    try:
        entry = _validate(quote, cross=cross, now=now, board=board)
    except validation.QuoteRejected as exc:
        return _reject(quote, exc, now=now, board=board, writes=writes), None
    board.accept(quote.pair, entry)
    metrics.QUOTES_ACCEPTED.labels(entry.provider).inc()
    state = board.state(quote.pair, now=now)
    item_id = board.items.get(quote.pair)
    if item_id is None:
        return Acceptance(quote, accepted=True), state
    metrics.RATE_AGE.labels(quote.pair).set(max(0.0, (now - entry.source_time).total_seconds()))
    decision = decide(quote.pair, state, now=now, incoming=entry, monotonic=time.monotonic())
    write = writes.add(item_id, decision, now=now)
    # Decided just now: the owner's next sweep need not decide it again before time moves it
    # (a pair that ticks every second is decided by its quotes, not by every tick too).
    written = decision.current is not None and write is not None
    board.set_quiet(quote.pair, _quiet_until(state, now=now, written=written), _generation(board))
    result = Acceptance(
        quote,
        accepted=True,
        stored=write is not None and bool(write.history),
        published=decision.current is not None,
    )
    if write is not None:
        write.results.append(result)
    return result, state


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


@dataclass(frozen=True, slots=True)
class Decision:
    """What `decide` made of one pair at one moment: `Writes` and publishing only read it.

    `current` is the pair's new current rate when it is news (to write and publish), else None;
    `history` the entries whose history rows are due for storing when due (the quote that led
    here, and the entry the new current rate rests on); `excluded` the sources a consensus
    newly leaves out (each a `quote.excluded` event).
    """

    pair: str
    current: Current | None
    previous: Current | None
    history: tuple[Entry, ...] = ()
    excluded: tuple[dict[str, Any], ...] = ()


def decide(
    pair: str,
    state: PairState,
    *,
    now: datetime,
    incoming: Entry | None = None,
    monotonic: float,
) -> Decision:
    """The pair's one decision (pure: its state, the moment, the quote that led here)."""
    # Through a broken peg, an entry priced through the proxy is converted with the peg's
    # measured value and serves as `depeg` (docs/rates.md#pegs), under either pricing.
    state, depegged = _through_pegs(pair, state)
    if state.mode == policy.CONSENSUS:
        current, serving = _priced_by_consensus(
            state, now=now, monotonic=monotonic, depegged=depegged
        )
    else:
        current, serving = _priced_by_priority(
            state, now=now, monotonic=monotonic, depegged=depegged
        )
    history: list[Entry] = []
    # Every provider's quotes are history; a cross rate is computed, not observed: it is
    # history only while it serves.
    if incoming is not None and (not incoming.derived or incoming == serving):
        history.append(incoming)
    # The entry that serves the new current rate is stored with it when due, whichever quote
    # led to the decision (see `Writes`).
    if current is not None and serving is not None and serving not in history:
        history.append(serving)
    previous = state.current
    excluded: tuple[dict[str, Any], ...] = ()
    if current is not None:
        before = previous.excluded_providers if previous is not None else frozenset()
        excluded = tuple(
            source
            for source in current.sources
            if source["reason"] == consensus.OUTLIER and source["provider"] not in before
        )
    return Decision(pair, current, previous, tuple(history), excluded)


def _through_pegs(pair: str, state: PairState) -> tuple[PairState, frozenset[str]]:
    """The state with each usable entry as served given the proxy's peg, and the providers
    whose entries were converted because the peg is broken."""
    monitor = peg_monitor.get_monitor()
    usable: list[Entry] = []
    depegged: set[str] = set()
    for entry in state.usable:
        served, status = monitor.through(pair, entry, policy.LIVE)
        if status == pegs.DEPEG:
            depegged.add(served.provider)
        usable.append(served)
    if not depegged:
        return state, frozenset()
    return replace(state, usable=tuple(usable)), frozenset(depegged)


def _stale_news(state: PairState) -> Current | None:
    """No fresh source: keep the last value, and say so once (a new pair's first round first,
    which may yet bring one)."""
    current = state.current
    if current is None or current.status == policy.STALE or state.awaits_better(None):
        return None
    return replace(current, status=policy.STALE, version=current.version + 1)


def _source(entry: Entry, *, excluded: bool = False, reason: str | None = None) -> dict[str, Any]:
    return {
        "provider": entry.provider,
        "value": entry.value,
        "bid": entry.bid,
        "ask": entry.ask,
        "source_time": entry.source_time,
        "excluded": excluded,
        "reason": reason,
    }


def independent(usable: Iterable[Entry]) -> list[Entry]:
    """One source per provider, best first: a cross rate counts only when none of its legs'
    providers is already a source (BTC-RUB: coingecko, then binance+cbr, not coingecko+cbr)."""
    chosen: list[Entry] = []
    seen: set[str] = set()
    for entry in usable:
        if seen.isdisjoint(entry.sources):
            chosen.append(entry)
            seen.update(entry.sources)
    return chosen


def _priced_by_priority(
    state: PairState, *, now: datetime, monotonic: float, depegged: frozenset[str]
) -> tuple[Current | None, Entry | None]:
    """The highest-priority fresh entry serves (docs/rates.md#failover)."""
    best = state.best()
    if best is None:
        return _stale_news(state), None
    current = state.current
    status = policy.serving_status(best.priority, state.expected)
    if best.provider in depegged:
        status = pegs.DEPEG
    if status != policy.LIVE and state.awaits_better(best.priority):
        # A new pair's first round: a provider that outranks `best` has not answered yet, and
        # its answer, not the first to arrive, makes the pair's first status.
        return None, best
    others = [entry for entry in independent(state.usable) if entry is not best]
    evidence: dict[str, Any] = {
        "mode": policy.PRIORITY,
        "n_sources": 1,
        "dispersion_bps": None,
        "sources": (
            _source(best),
            *(_source(entry, excluded=True, reason="priority") for entry in others),
        ),
    }
    if current is not None and current.same_rate(best) and current.mode == policy.PRIORITY:
        checked_at = max(current.checked_at, best.checked_at)
        confirmed = checked_at > current.checked_at
        heartbeat_due = monotonic - current.written >= policy.heartbeat_seconds()
        if status == current.status and not (confirmed and heartbeat_due):
            return None, best
        news = replace(
            current,
            bid=best.bid,
            ask=best.ask,
            checked_at=checked_at,
            route=best.route,
            status=status,
            version=current.version + 1,
            **evidence,
        )
        return news, best
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
        **evidence,
    ), best


def _priced_by_consensus(
    state: PairState, *, now: datetime, monotonic: float, depegged: frozenset[str]
) -> tuple[Current | None, Entry | None]:
    """The median of every independent fresh source, outliers left out
    (docs/rates.md#consensus-pricing); served under the provider `consensus`."""
    entries = independent(state.usable)
    if not entries:
        return _stale_news(state), None
    priced = consensus.price(
        [consensus.Source(e.provider, e.value, e.bid, e.ask, e.source_time) for e in entries],
        places=validation.DECIMAL_PLACES,
    )
    status = policy.LIVE if priced.n_sources >= settings.KURS_CONSENSUS_MIN_SOURCES else policy.THIN
    if status != policy.LIVE and state.awaits_better(None):
        return None, None  # a new pair's first round: the others may yet agree
    by_provider = {entry.provider: entry for entry in entries}
    included = [by_provider[s.provider] for s in priced.sources if not s.excluded]
    if status == policy.LIVE and not depegged.isdisjoint(entry.provider for entry in included):
        status = pegs.DEPEG
    sources = tuple(
        _source(by_provider[s.provider], excluded=s.excluded, reason=s.reason)
        for s in priced.sources
    )
    checked_at = max(entry.checked_at for entry in included)
    source_time = max(entry.source_time for entry in included)
    serving = Entry(
        provider=policy.CONSENSUS_PROVIDER,
        value=priced.value,
        source_time=source_time,
        fresh_until=policy.fresh_until(policy.CONSENSUS_PROVIDER, checked_at),
        priority=policy.provider_priority(policy.CONSENSUS_PROVIDER),
        bid=priced.bid,
        ask=priced.ask,
        derived=all(entry.derived for entry in included),
    )
    current = state.current
    version = (current.version if current else 0) + 1
    if (
        current is not None
        and current.provider == policy.CONSENSUS_PROVIDER
        and current.value == priced.value
        and current.status == status
        and current.n_sources == priced.n_sources
        and current.excluded_providers == frozenset(s.provider for s in priced.excluded)
    ):
        checked_at = max(current.checked_at, checked_at)
        confirmed = checked_at > current.checked_at
        if not (confirmed and monotonic - current.written >= policy.heartbeat_seconds()):
            return None, serving
    received_at = (
        current.received_at
        if current is not None
        and current.provider == serving.provider
        and current.value == serving.value
        else now
    )
    return Current(
        provider=serving.provider,
        value=serving.value,
        bid=serving.bid,
        ask=serving.ask,
        source_time=source_time,
        checked_at=checked_at,
        received_at=received_at,
        derived=serving.derived,
        route=(),
        status=status,
        version=version,
        mode=policy.CONSENSUS,
        n_sources=priced.n_sources,
        dispersion_bps=priced.dispersion_bps,
        sources=sources,
    ), serving


@dataclass(eq=False)
class Write:
    """One decision's rows, as `Writes` collects them: the history rows due (each with its
    `board.last_stored` key), and when the current rate is news its columns, the time it is
    served from, and its events (`rate.updated` first)."""

    item_id: int
    decision: Decision
    # (`board.last_stored` key, the row's columns: `rates.models.RATE_ROWS`)
    history: list[tuple[tuple[str, str], dict[str, Any]]]
    fields: dict[str, Any] | None = None
    served_at: datetime | None = None
    envelopes: list[events.Envelope] = field(default_factory=list)
    # What said this write stored a row: told otherwise if it fails.
    results: list[Acceptance] = field(default_factory=list)

    @property
    def pair(self) -> str:
        return self.decision.pair


class Writes:
    """The writes of a burst of decisions (the quotes the streams delivered meanwhile, a REST
    round, a re-evaluation), in order; `flush` writes them all in one transaction, one commit,
    then their events leave (docs/scaling.md#the-owner).

    Each decision is applied to the board when added (the next one in the burst builds on it:
    the next `version`, whether a history row is due). When the transaction fails, `flush`
    restores what the board held before the burst, then writes each decision in a transaction
    of its own, as before bursts: the write that fails, fails alone (its pair's later versions
    in the burst with it: the owner's next tick decides the pair again), the others are kept.
    No row of a failed write remains (the history row, the current rate, its served version and
    its outbox row go together) and the board learns only what was committed, so a failed write
    is simply decided again.
    """

    def __init__(self, board: QuoteBoard) -> None:
        self.board = board
        self.pending: list[Write] = []
        self._current_before: dict[str, Current | None] = {}
        self._stored_before: dict[tuple[str, str], tuple[Any, datetime] | None] = {}
        # The last history row of every pair and provider stored within STORE_EVERY, read in
        # one query at the burst's first pair the board has no row of (a new owner's first
        # burst: one query, not one per pair and provider).
        self._recent: tuple[set[int], dict[tuple[int, str], tuple[Any, datetime]]] | None = None

    def add(self, item_id: int, decision: Decision, *, now: datetime) -> Write | None:
        """Collect the rows of one decision (none when nothing is due, or this board may not
        write) and apply it to the board."""
        board, pair, current = self.board, decision.pair, decision.current
        if (current is None and not decision.history) or not board.writable():
            return None
        write = Write(item_id, decision, [])
        try:
            for entry in decision.history:
                row = self._history_row(item_id, pair, entry, current, now=now)
                if row is not None:
                    write.history.append(((pair, entry.provider), row))
        except DatabaseError as exc:
            # The last history row could not be read: nothing of this decision is written,
            # the next one (the owner's tick at the latest) decides the pair again.
            logger.error("cannot read the last history row of %s: %s", pair, exc)
            close_old_connections()
            return None
        if current is not None:
            write.fields = _current_columns(current)
            write.served_at = timezone.now()
            write.envelopes.append(events.make_envelope("rate.updated", rate_event(pair, current)))
            write.envelopes.extend(
                events.make_envelope("quote.excluded", excluded_event(pair, current, source))
                for source in decision.excluded
            )
            if pair not in self._current_before:
                self._current_before[pair] = board.get_current(pair)
        elif not write.history:
            return None
        self._apply(write)
        self.pending.append(write)
        return write

    def _history_row(
        self, item_id: int, pair: str, entry: Entry, current: Current | None, *, now: datetime
    ) -> dict[str, Any] | None:
        """`entry`'s history row when due, its columns (`RATE_ROWS`); a consensus row keeps its
        evidence (from `current`)."""
        key = (pair, entry.provider)
        last = self.board.last_stored.get(key)
        if last is None:  # once per pair and provider per owner: later rows are remembered
            if self._recent is None:
                self._recent = _recent_history(set(self.board.items.values()), now=now)
            covered, recent = self._recent
            if item_id in covered:
                last = recent.get((item_id, entry.provider))
            else:  # an item the board did not list (yet): its own query
                last = (
                    Rate.objects.filter(item_id=item_id, provider=entry.provider)
                    .order_by("-received_at", "-id")
                    .values_list("value", "received_at")
                    .first()
                )
        if last is not None and last[0] == entry.value and now - last[1] < policy.STORE_EVERY:
            return None
        if key not in self._stored_before:
            self._stored_before[key] = self.board.last_stored.get(key)
        return {
            "item_id": item_id,
            "provider": entry.provider,
            "value": entry.value,
            "bid": entry.bid,
            "ask": entry.ask,
            "source_time": entry.source_time,
            "received_at": now,
            "derived": entry.derived,
            **_history_evidence(entry, current),
        }

    def _apply(self, write: Write) -> None:
        for key, row in write.history:
            self.board.last_stored[key] = (row["value"], row["received_at"])
        if write.decision.current is not None:
            self.board.set_current(write.pair, write.decision.current)

    def _restore(self) -> None:
        """The board as before the burst (its writes were rolled back)."""
        for pair, current in self._current_before.items():
            self.board.restore_current(pair, current)
        for key, stored in self._stored_before.items():
            if stored is None:
                self.board.last_stored.pop(key, None)
            else:
                self.board.last_stored[key] = stored

    def flush(self) -> None:
        """Write what was collected: one transaction; each write alone if that one fails."""
        pending, self.pending = self.pending, []
        try:
            if not pending:
                return
            try:
                with transaction.atomic():
                    _write_rows(pending)
            except DatabaseError as exc:
                self._restore()
                if len(pending) == 1:
                    self._failed(pending[0], exc)
                    return
                logger.warning(
                    "a burst of %d writes failed (%s); writing each alone", len(pending), exc
                )
                self._one_by_one(pending)
                return
            for write in pending:
                _observe(write)
        finally:
            self._current_before.clear()
            self._stored_before.clear()
            self._recent = None

    def _one_by_one(self, pending: list[Write]) -> None:
        failed: set[str] = set()
        for write in pending:
            if write.pair in failed:
                # Its version follows the one that failed: decided again on the next tick.
                for result in write.results:
                    result.stored = False
                continue
            try:
                with transaction.atomic():
                    _write_rows([write])
            except DatabaseError as exc:
                failed.add(write.pair)
                self._failed(write, exc)
                continue
            self._apply(write)
            _observe(write)

    def _failed(self, write: Write, exc: DatabaseError) -> None:
        pair = write.pair
        for result in write.results:
            result.stored = False
        if isinstance(exc, IntegrityError):
            # The item was deleted while a quote for it was in flight: a normal race, not a fault.
            logger.warning("%s was deleted while being quoted; its rate is dropped", pair)
            self.board.forget_items()
            self.board.drop_current(pair)
            return
        # The quote is still valid and still served; a broken connection is dropped so that
        # the next write reconnects (streams never pause).
        decision = write.decision
        subject = decision.current or decision.history[0]
        logger.error("cannot store the %s rate of %s: %s", subject.provider, pair, exc)
        close_old_connections()


def _recent_history(
    item_ids: set[int], *, now: datetime
) -> tuple[set[int], dict[tuple[int, str], tuple[Any, datetime]]]:
    """`item_ids`, and (item id, provider) -> (value, received_at) of the last history row of
    each stored within STORE_EVERY: an older last row, or none, makes a row due alike."""
    rows = (
        # By time alone (the `rate_received` index): no list of a thousand ids in the query.
        Rate.objects.filter(received_at__gt=now - policy.STORE_EVERY)
        .order_by("received_at", "id")
        .values_list("item_id", "provider", "value", "received_at")
    )
    # Oldest first: each key keeps its last row.
    recent = {
        (item_id, provider): (value, at)
        for item_id, provider, value, at in rows
        if item_id in item_ids
    }
    return item_ids, recent


def _write_rows(writes: Sequence[Write]) -> None:
    """The rows of `writes`, in the current transaction: the history rows, each item's current
    rate (its last version in the burst), every served version, and their outbox rows (events
    published in order on commit): an insert (or upsert) each, whatever the burst's size."""
    RATE_ROWS.write(row for write in writes for _, row in write.history)
    connection = connections[DEFAULT_DB_ALIAS]
    # Each version's columns prepared once: its current rate and its served version hold them.
    versions = [
        (write, CURRENT_ROWS.prepare({"item_id": write.item_id, **write.fields}, connection))
        for write in writes
        if write.fields is not None
    ]
    if not versions:
        return
    _write_currents({write.item_id: values for write, values in versions})
    # The same transaction: the log is what was served, named by the event that announced it.
    servedlog.record_all(
        (values, write.envelopes[0]["id"], write.served_at or timezone.now())
        for write, values in versions
    )
    events.publish_all_on_commit([e for write, _ in versions for e in write.envelopes])


def _observe(write: Write) -> None:
    """A committed write's metrics."""
    for _, row in write.history:
        metrics.RATES_STORED.labels(row["provider"]).inc()
    current = write.decision.current
    if current is not None:
        _observe_current(write.pair, write.decision, current)


def _export_current(pair: str, current: Current) -> None:
    """The pair's status and last-confirmation gauges."""
    metrics.RATE_STATUS.labels(pair).set(metrics.STATUS_VALUES[current.status])
    metrics.RATE_CHECKED.labels(pair).set(current.checked_at.timestamp())


def _observe_current(pair: str, decision: Decision, current: Current) -> None:
    """The pair's gauges, a failover each time another provider takes over (a pair never
    served before has nothing to fail over from, whatever its first status), and each source
    a consensus newly left out."""
    _export_current(pair, current)
    for source in decision.excluded:
        metrics.QUOTES_EXCLUDED.labels(source["provider"], source["reason"]).inc()
    previous = decision.previous
    if (
        current.status == policy.FAILOVER
        and previous is not None
        and (previous.status != policy.FAILOVER or previous.provider != current.provider)
    ):
        metrics.FAILOVERS.labels(pair, current.provider).inc()


# A history row priced from one provider's quote (the columns' defaults, written explicitly).
_ONE_SOURCE: dict[str, Any] = {"mode": policy.PRIORITY, "n_sources": 1, "dispersion_bps": None}


def _history_evidence(entry: Entry, current: Current | None) -> dict[str, Any]:
    if entry.provider != policy.CONSENSUS_PROVIDER or current is None:
        return _ONE_SOURCE  # one provider's quote
    return {
        "mode": current.mode,
        "n_sources": current.n_sources,
        "dispersion_bps": current.dispersion_bps,
    }


def _current_columns(current: Current) -> dict[str, Any]:
    """The CurrentRate row's columns (and the served version's: `rates.servedlog`)."""
    fields = {name: getattr(current, name) for name in CURRENT_FIELDS}
    fields["route"] = _route_to_db(current.route)
    fields["sources"] = sources_to_db(current.sources)
    return fields


def _write_currents(rows: dict[int, tuple[Any, ...]]) -> None:
    """item id -> its row, prepared (`CURRENT_ROWS.prepare`; the item's last version in the
    burst): one upsert (an UPDATE in the common case, an INSERT for a pair's first rate)."""
    CURRENT_ROWS.write_prepared(list(rows.values()))


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
    quote: Quote,
    rejection: validation.QuoteRejected,
    *,
    now: datetime,
    board: QuoteBoard,
    writes: Writes,
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
        reevaluate(pairs=[quote.pair], now=now, board=board, writes=writes)
    return Acceptance(quote, accepted=False, reason=rejection.reason)


def _cross_quotes(
    leg: str, state: PairState, *, now: datetime, board: QuoteBoard
) -> list[CrossQuote]:
    """Cross rates of tracked items that use `leg`, from the best fresh direct quote of each leg
    (`leg`'s from its state as just decided, the other's from the board)."""
    crosses = []
    for code, first, second in _dependants(leg, board):
        one, two = (
            state.best(direct_only=True)
            if pair.code == leg
            else board.state(pair.code, now=now).best(direct_only=True)
            for pair in (first, second)
        )
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
        **evidence(current),
    }


def evidence(current: Current) -> dict[str, Any]:
    """The evidence fields of every current-rate payload (docs/api.md#json-shapes), computed
    once per version: `mode`, `n_sources`, `dispersion_bps`, `bid`, `ask`, `spread_bps` and
    `sources` (which readers show only with `expand=sources`)."""
    return {
        "mode": current.mode,
        "n_sources": current.n_sources,
        "dispersion_bps": current.dispersion_bps,
        "bid": current.bid,
        "ask": current.ask,
        "spread_bps": consensus.spread_bps(current.bid, current.ask, current.value),
        "sources": list(current.sources),
    }


def excluded_event(pair: str, current: Current, source: dict[str, Any]) -> dict[str, Any]:
    """`quote.excluded` data (docs/events.md#envelope-and-event-types)."""
    return {
        "direction": pair,
        "provider": source["provider"],
        "value": source["value"],
        "median": current.value,
        "reason": source["reason"],
    }


def reevaluate(
    *,
    pairs: Iterable[str] | None = None,
    now: datetime | None = None,
    board: QuoteBoard | None = None,
    writes: Writes | None = None,
) -> int:
    """Decide every (or the given) pair again without a new quote; returns how many changed.

    Time alone changes who serves: a quote outlives its freshness window, so the next provider
    (or `stale`) must show without waiting for another quote. The owner calls this every second.
    What changed is written in one transaction (or with `writes`, the burst being decided).
    """
    board = board or _board
    now = now or timezone.now()
    items = active_items(board=board)
    burst = writes or Writes(board)
    changed = 0
    # A sweep of every pair (the owner's tick) skips the pairs found quiet until later: at
    # 1,000 pairs deciding each anew every tick was a third of the owner's time
    # (docs/scaling.md#the-owner).
    sweep = pairs is None
    generation = _generation(board)
    for pair in board.pairs() if sweep else list(pairs or ()):
        item_id = items.get(pair)
        if item_id is None or (sweep and board.is_quiet(pair, now, generation)):
            continue
        state = board.state(pair, now=now)
        decision = decide(pair, state, now=now, monotonic=time.monotonic())
        if decision.current is not None:
            burst.add(item_id, decision, now=now)
            changed += 1
        elif sweep:
            board.set_quiet(pair, _quiet_until(state, now=now), generation)
    if writes is None:
        burst.flush()
    return changed


def _generation(board: QuoteBoard) -> tuple[int, Any]:
    """What every pair's decision rests on besides its own entries: the board's generation and
    the proxy's peg conversion."""
    return board.generation, peg_monitor.get_monitor().conversion()


def _quiet_until(state: PairState, *, now: datetime, written: bool = False) -> datetime:
    """Until when deciding the pair again without news cannot change its decision (`written`:
    the decision just made wrote a new current rate): time alone moves it when a usable
    entry's freshness window ends, or its heartbeat falls due (a first round waits for the
    clock: never quiet)."""
    if state.awaited:
        return now
    ends = [entry.fresh_until for entry in state.usable]
    current = state.current
    if written:
        ends.append(now + timedelta(seconds=policy.heartbeat_seconds()))
    elif current is not None and any(e.checked_at > current.checked_at for e in state.usable):
        # Something to confirm: the heartbeat writes it once due. (Nothing newer: only a new
        # quote, which wakes the pair, can bring a confirmation.)
        due = current.written + policy.heartbeat_seconds() - time.monotonic()
        ends.append(now + timedelta(seconds=max(0.0, due)))
    return min(ends, default=now + timedelta(days=1))


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
