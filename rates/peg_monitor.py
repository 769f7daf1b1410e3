"""Pegs on the live owner, and their state in the shared cache (docs/rates.md#pegs).

The owner measures every peg of `KURS_PEGS` on its clock (`evaluate`, every quarter second and
after each cycle, before the pairs are decided again), from the quotes on its board, with the
pure rules of `rates.pegs`. A state change publishes `peg.broken` / `peg.restored`; the gauges
follow; the states go to the "shared" cache (Redis with REDIS_URL, files under var/ otherwise),
where `GET /api/v1/pegs` and the health check of any web process read them (`peg_statuses`).

`through` is the decide step's hook: a pair served through the USD proxy while the proxy's peg
is broken is converted with the measured value and marked `depeg` (`rates.pegs.through`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches

from rates import metrics, pegs
from rates.board import Entry, QuoteBoard
from rates.notices import OutageNotice
from realtime import events

logger = logging.getLogger("rates.fetcher")

STATE_KEY = "rates:pegs"


class PegMonitor:
    """Every configured peg's state on this process (only the owner's is ever saved)."""

    def __init__(self, configured: tuple[pegs.Peg, ...]) -> None:
        self.pegs = configured
        self.states = {peg.pair: pegs.PegState(peg) for peg in configured}
        self._lock = threading.Lock()
        self._proxy: pegs.PegState | None = None
        self.dirty = True
        # time.monotonic() of the last `follow`; never: -inf (the clock's origin is undefined).
        self._followed = -math.inf
        # The board's pairs, proxy and aliases `_used` was computed for; the pairs pegs use.
        self._used_for: tuple[Any, ...] | None = None
        self._used: frozenset[str] = frozenset()

    def evaluate(self, board: QuoteBoard, *, now: datetime) -> list[str]:
        """Measure every peg from the board; publish and log each change; the events sent.

        An owner of some shards but not the global one measures nothing: it follows the states
        the global shard's owner saved (`follow`), so that every owner converts through the
        same peg state, measured from one board."""
        if not self.states:
            return []
        if board.writable() and not board.global_writable():
            self.follow(now=now)
            return []
        accepted = self._accepted(board)
        sent = []
        for key, previous in list(self.states.items()):
            evidence = pegs.observe(previous.peg, accepted, now=now, proxy=settings.KURS_USD_PROXY)
            current = pegs.step(previous, pegs.measure(evidence), evidence, now=now)
            change = pegs.transition(previous, current)
            with self._lock:
                self.states[key] = current
            if current != previous:
                self.dirty = True
            if current.state != previous.state or current.value != previous.value:
                self._export(current)
            if change is not None and board.global_writable():
                log = logger.warning if change == "peg.broken" else logger.info
                log(
                    "%s: %s is worth %s %s (band %s)",
                    change,
                    current.peg.asset,
                    current.value,
                    current.peg.reference,
                    current.peg.band,
                )
                events.publish(change, current.event())
                sent.append(change)
        with self._lock:
            self._proxy = pegs.proxy_peg(self.states.values(), settings.KURS_USD_PROXY)
        return sent

    def _accepted(self, board: QuoteBoard) -> dict[str, dict[str, Entry]]:
        """A copy of the board's accepted quotes of the pairs some peg uses (`pegs.used_pairs`,
        recomputed when the board's pairs change): only those are copied and scanned."""
        proxy = settings.KURS_USD_PROXY
        aliases = frozenset(settings.KURS_ASSET_ALIASES.items())
        key = (frozenset(list(board.accepted)), proxy, aliases)
        if key != self._used_for:
            used: set[str] = set()
            for peg in self.pegs:
                used |= pegs.used_pairs(peg, key[0], proxy=proxy)
            self._used_for, self._used = key, frozenset(used)
        accepted = board.accepted
        return {
            pair: dict(entries)
            for pair in self._used
            if (entries := accepted.get(pair)) is not None
        }

    def through(self, pair: str, entry: Entry, status: str) -> tuple[Entry, str]:
        with self._lock:
            proxy = self._proxy
        return pegs.through(pair, entry, status, proxy)

    def conversion(self) -> Decimal | None:
        """What `through` converts proxied entries with now (None: they serve as they are): a
        sweep's decisions hold while it does not change (`rates.services.reevaluate`)."""
        with self._lock:
            peg = pegs.broken(self._proxy)
        return None if peg is None else peg.value

    def _export(self, state: pegs.PegState) -> None:
        metrics.PEG_STATE.labels(state.peg.pair).set(metrics.PEG_VALUES[state.state])
        deviation = state.deviation
        metrics.PEG_DEVIATION.labels(state.peg.pair).set(float(deviation or 0))

    def flush(self, board: QuoteBoard) -> None:
        """Save the states to the shared cache if they changed (sync: blocking I/O)."""
        if not self.dirty or not board.global_writable():
            return
        self.dirty = False
        with self._lock:
            saved = [_saved(state) for state in self.states.values()]
        try:
            caches["shared"].set(STATE_KEY, saved, None)
        except Exception as exc:
            self.dirty = True
            saving.failed(exc)
        else:
            saving.worked()

    def follow(self, *, now: datetime) -> None:
        """The states the global owner saved, read at most every READ_EVERY seconds."""
        if time.monotonic() - self._followed < READ_EVERY:
            return
        self._followed = time.monotonic()
        self.load(now=now)
        self.dirty = False  # read, not measured: nothing of this process's to save
        for state in list(self.states.values()):
            self._export(state)

    def load(self, *, now: datetime) -> None:
        """A new owner's start: the states the last owner saved, so that a peg broken before a
        restart or a hand-over is not served as whole until measured again."""
        rows = zip(peg_statuses(), self.pegs, strict=True)
        loaded = {peg.pair: _loaded(row, peg, now) for row, peg in rows}
        with self._lock:
            self.states = loaded
            self._proxy = pegs.proxy_peg(loaded.values(), settings.KURS_USD_PROXY)
        self.dirty = True


def _saved(state: pegs.PegState) -> dict[str, Any]:
    body = state.to_json()
    for name in ("band", "value", "deviation"):
        body[name] = None if body[name] is None else str(body[name])
    body["since"] = None if state.since is None else state.since.isoformat()
    body["evidence"] = [{"source": o.source, "value": str(o.value)} for o in state.evidence]
    return body


saving = OutageNotice(
    "cannot save peg states to the shared cache (retried at every flush): %s",
    "peg states are saved to the shared cache again",
)

_monitor: PegMonitor | None = None


def get_monitor() -> PegMonitor:
    """The process's monitor, for the pegs configured now (tests change KURS_PEGS)."""
    global _monitor
    configured = _configured()
    if _monitor is None or (_monitor.pegs is not configured and _monitor.pegs != configured):
        _monitor = PegMonitor(configured)
    return _monitor


# The proxy's peg as a web process last read it: (time.monotonic() of the read, the state).
_read: tuple[float, pegs.PegState | None] | None = None
READ_EVERY = 0.5


async def proxy_peg() -> pegs.PegState | None:
    """The USD proxy's peg as the owner last saved it, read at most every READ_EVERY seconds
    (on-demand pairs priced through the proxy in a web process, docs/rates.md#pegs)."""
    global _read
    now = time.monotonic()
    if _read is not None and now - _read[0] < READ_EVERY:
        return _read[1]
    rows = await sync_to_async(peg_statuses)()
    states = [_loaded(row, peg) for row, peg in zip(rows, _configured(), strict=True)]
    state = pegs.proxy_peg(states, settings.KURS_USD_PROXY)
    _read = (now, state)
    return state


# KURS_PEGS as read last, and its pegs.
_pegs: tuple[list[Any], tuple[pegs.Peg, ...]] | None = None


def _configured() -> tuple[pegs.Peg, ...]:
    """KURS_PEGS as pegs, built again only when the setting's value changes (tests override
    it): every decision asks (`get_monitor`), and building them each time was a cost per quote
    at 1,000 pairs (docs/scaling.md#the-owner)."""
    global _pegs
    raw = settings.KURS_PEGS
    if _pegs is None or _pegs[0] != raw:
        _pegs = (list(raw), pegs.configured(raw))
    return _pegs[1]


def _loaded(row: dict[str, Any], peg: pegs.Peg, now: datetime | None = None) -> pegs.PegState:
    since = row["since"]
    return pegs.PegState(
        peg,
        state=row["state"],
        value=None if row["value"] is None else Decimal(row["value"]),
        since=None if since is None else datetime.fromisoformat(since),
        measured_at=now,
    )


def peg_statuses() -> list[dict[str, Any]]:
    """Each configured peg as the owner last saved it (`unknown` before any owner measured it,
    or when the shared cache cannot be read)."""
    try:
        saved = caches["shared"].get(STATE_KEY) or []
    except Exception:
        logger.warning("peg states: the shared cache is unreachable", exc_info=True)
        saved = []
    by_pair = {f"{row['asset']}-{row['reference']}": row for row in saved}
    statuses = []
    for peg in _configured():
        row = by_pair.get(peg.pair)
        if row is None or row.get("band") != str(peg.band):
            row = _saved(pegs.PegState(peg))
        statuses.append(row)
    return statuses
