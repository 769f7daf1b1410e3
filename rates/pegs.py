"""Pegs: assets assumed equal to a reference within a band (`KURS_PEGS`, docs/rates.md#pegs).

Pure rules, no I/O: what the board's quotes say a peg is worth (`observe`, `measure`), whether
that is inside the band (`step`, a state machine with hysteresis so that a peg at the edge of
its band does not flap), and what a pair priced through a broken peg becomes (`through`). The
live owner runs them (`rates.peg_monitor`) in its decide step.

Evidence for USDT:USD, from quotes Kurs already has:

- a direct quote of the asset in the reference: CoinGecko's USDT-USD (the USDTTRC-USD and
  USDTERC-USD items, aliases of USDT);
- the premium implied by one coin quoted in both: CoinGecko's true BTC-USD divided by
  Binance's or Bybit's BTC-USDT (the BTC-USD those exchanges serve through the USD proxy).

The measured value is the median of every fresh observation, so one odd source moves nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

from rates import policy, validation
from rates.board import Entry
from rates.providers import Pair

OK = "ok"
BROKEN = "broken"
UNKNOWN = "unknown"
# The status of a pair priced through a broken peg (docs/api.md#json-shapes).
DEPEG = "depeg"
# Hysteresis: a peg breaks as soon as its measured value leaves the band, and is restored only
# once back within this fraction of the band for RESTORE_HOLD (a value hovering at the edge
# of the band, or one good quote in a crisis, restores nothing).
RESTORE_FRACTION = Decimal("0.5")
RESTORE_HOLD = timedelta(seconds=10)
# Measured values are kept to this many places (a USDT price to a millionth of a dollar):
# finer moves would only re-price every pair through the peg on every quote's noise.
PLACES = Decimal("1E-6")
# Implied observations are kept to this many places (the events carry them).
EVIDENCE = Decimal("1E-8")
# The `provider` of the peg's leg in a converted rate's `route`.
PEG_PROVIDER = "peg"


@dataclass(frozen=True, slots=True)
class Peg:
    asset: str
    reference: str
    band: Decimal

    @property
    def pair(self) -> str:
        return f"{self.asset}-{self.reference}"


@dataclass(frozen=True, slots=True)
class Observation:
    """One piece of evidence: what `source` says one unit of the asset is worth."""

    source: str
    value: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "value": self.value}


@dataclass(frozen=True, slots=True)
class PegState:
    peg: Peg
    state: str = UNKNOWN
    value: Decimal | None = None
    # When `state` last changed (None before the first measurement).
    since: datetime | None = None
    evidence: tuple[Observation, ...] = ()
    # While broken: since when the value is back near parity (the restore hold's clock).
    near_since: datetime | None = None
    measured_at: datetime | None = None

    @property
    def deviation(self) -> Decimal | None:
        """How far the asset is from its reference, as a signed fraction (-0.03: 3 % below)."""
        return None if self.value is None else self.value - 1

    def to_json(self) -> dict[str, Any]:
        """`GET /api/v1/pegs` (docs/api.md#get-apiv1pegs); times as aware datetimes."""
        return {
            "asset": self.peg.asset,
            "reference": self.peg.reference,
            "band": self.peg.band,
            "value": self.value,
            "deviation": self.deviation,
            "state": self.state,
            "since": self.since,
            "evidence": [observation.to_json() for observation in self.evidence],
        }

    def event(self) -> dict[str, Any]:
        """`peg.broken` / `peg.restored` data (docs/events.md#envelope-and-event-types)."""
        return {
            "asset": self.peg.asset,
            "reference": self.peg.reference,
            "value": self.value,
            "band": self.peg.band,
            "evidence": [observation.to_json() for observation in self.evidence],
        }


def configured(raw: Iterable[tuple[str, str, Decimal]]) -> tuple[Peg, ...]:
    """`settings.KURS_PEGS` (validated by config.env.pegs) as pegs."""
    return tuple(Peg(asset, reference, band) for asset, reference, band in raw)


# --- Measuring -----------------------------------------------------------------------------
def _assets(pair: str) -> tuple[str, str]:
    parsed = Pair.parse(pair)
    return policy.canonical_asset(parsed.base), policy.canonical_asset(parsed.quote)


def _true(entry: Entry, now: datetime) -> bool:
    """A fresh quote that is what it says: not a cross rate, not served through the proxy."""
    return entry.fresh_until >= now and not entry.derived and not entry.proxied


def observe(
    peg: Peg, board: Mapping[str, Mapping[str, Entry]], *, now: datetime, proxy: str
) -> list[Observation]:
    """Every fresh observation of `peg` in the board's accepted quotes (pair -> provider ->
    entry), one per source. `proxy` is KURS_USD_PROXY: a USD pair an exchange serves from its
    `proxy` market (BTC-USD from BTCUSDT) is a quote in that asset, the same as its BTC-USDT."""
    asset, reference = peg.asset, peg.reference
    proxied_is_asset = reference == "USD" and policy.canonical_asset(proxy) == asset
    direct: dict[str, Decimal] = {}
    # coin -> true quotes in the reference; coin -> source -> its quote in the asset.
    in_reference: dict[str, list[Decimal]] = {}
    in_asset: dict[str, dict[str, Decimal]] = {}
    for pair, entries in board.items():
        base, quote = _assets(pair)
        for entry in entries.values():
            if entry.fresh_until < now or entry.derived or entry.value <= 0:
                continue
            if (base, quote) == (asset, reference) and not entry.proxied:
                direct[f"{entry.provider} {peg.pair}"] = entry.value
            elif (base, quote) == (reference, asset) and not entry.proxied:
                direct[f"{entry.provider} {peg.pair}"] = (1 / entry.value).quantize(EVIDENCE)
            elif quote == reference and not entry.proxied:
                in_reference.setdefault(base, []).append(entry.value)
            elif quote == asset or (quote == reference and entry.proxied and proxied_is_asset):
                in_asset.setdefault(base, {})[f"{entry.provider} {base}-{asset}"] = entry.value
    found = [Observation(source, value) for source, value in sorted(direct.items())]
    for coin, quoted in sorted(in_asset.items()):
        true_values = in_reference.get(coin)
        if not true_values or coin in (asset, reference):
            continue
        price = statistics.median(true_values)
        for source, value in sorted(quoted.items()):
            implied = (price / value).quantize(EVIDENCE)
            found.append(Observation(f"{coin}-{reference} / {source}", implied))
    return found


def used_pairs(peg: Peg, pairs: Iterable[str], *, proxy: str) -> frozenset[str]:
    """The pairs among `pairs` that `observe` can draw `peg`'s evidence from (whether an entry
    of theirs counts is `observe`'s to say): the direct pairs, and both quotes of each coin
    quoted in the reference and in the asset. The owner measures from these alone: the rest of
    a board of a thousand pairs is never copied or scanned."""
    asset, reference = peg.asset, peg.reference
    proxied_is_asset = reference == "USD" and policy.canonical_asset(proxy) == asset
    used: set[str] = set()
    in_reference: dict[str, list[str]] = {}
    in_asset: dict[str, list[str]] = {}
    for pair in pairs:
        base, quote = _assets(pair)
        if (base, quote) in ((asset, reference), (reference, asset)):
            used.add(pair)
            continue
        if quote == reference:
            in_reference.setdefault(base, []).append(pair)
        if quote == asset or (quote == reference and proxied_is_asset):
            in_asset.setdefault(base, []).append(pair)
    for coin, quoted in in_asset.items():
        if coin in in_reference and coin not in (asset, reference):
            used.update(quoted, in_reference[coin])
    return frozenset(used)


def measure(observations: Sequence[Observation]) -> Decimal | None:
    """The median observation, to PLACES; None without evidence."""
    if not observations:
        return None
    return statistics.median(o.value for o in observations).quantize(PLACES)


# --- The state machine ---------------------------------------------------------------------
def step(
    previous: PegState, value: Decimal | None, evidence: Sequence[Observation], *, now: datetime
) -> PegState:
    """The peg's next state from its measured value (None: no evidence now).

    ok/unknown -> broken as soon as the value is outside the band; broken -> ok only after
    RESTORE_HOLD within RESTORE_FRACTION of the band. Without evidence an unbroken peg is
    `unknown` (the proxy applies as when it is ok), and a broken one stays broken at its last
    value: no pair is served through a peg nobody can vouch for.
    """
    peg = previous.peg

    def moved(state: str, **fields: Any) -> PegState:
        since = previous.since if previous.state == state and previous.since else now
        return replace(previous, state=state, since=since, measured_at=now, **fields)

    if value is None:
        if previous.state == BROKEN:
            return moved(BROKEN, evidence=(), near_since=None)
        return moved(UNKNOWN, value=None, evidence=(), near_since=None)
    distance = abs(value - 1)
    fields: dict[str, Any] = {"value": value, "evidence": tuple(evidence)}
    if previous.state != BROKEN:
        state = BROKEN if distance > peg.band else OK
        return moved(state, near_since=None, **fields)
    if distance > peg.band * RESTORE_FRACTION:
        return moved(BROKEN, near_since=None, **fields)
    near_since = previous.near_since or now
    if now - near_since >= RESTORE_HOLD:
        return moved(OK, near_since=None, **fields)
    return moved(BROKEN, near_since=near_since, **fields)


def transition(previous: PegState, current: PegState) -> str | None:
    """The event a state change publishes: `peg.broken`, `peg.restored`, or None."""
    if current.state == BROKEN and previous.state != BROKEN:
        return "peg.broken"
    if previous.state == BROKEN and current.state != BROKEN:
        return "peg.restored"
    return None


# --- Pricing through a peg -----------------------------------------------------------------
def proxy_peg(states: Iterable[PegState], proxy: str) -> PegState | None:
    """The state of the peg the USD proxy rests on (`proxy`:USD), if one is configured."""
    asset = policy.canonical_asset(proxy) if proxy else None
    return next(
        (s for s in states if s.peg.asset == asset and s.peg.reference == "USD"),
        None,
    )


def _peg_leg(peg: PegState, fallback_time: datetime) -> dict[str, Any]:
    return {
        "pair": peg.peg.pair,
        "provider": PEG_PROVIDER,
        "value": peg.value,
        "source_time": peg.measured_at or fallback_time,
    }


def _market_leg(pair: str, peg: PegState, provider: str, value: Decimal, when: datetime) -> Any:
    """A proxied direct quote as the market it is: BTC-USD from binance is its BTC-USDT."""
    market = f"{Pair.parse(pair).base}-{peg.peg.asset}"
    return {"pair": market, "provider": provider, "value": value, "source_time": when}


def _times(value: Decimal | None, rate: Decimal, power: int = 1) -> Decimal | None:
    """`value` × rate^power, exact, then rounded once to the stored 18 places (None: unusable)."""
    if value is None:
        return None
    with localcontext() as context:
        context.prec = 80
        return validation.optional_value(value * rate**power)


def broken(peg: PegState | None) -> PegState | None:
    """`peg` when it is broken with a measured value, else None (the proxy applies)."""
    return peg if peg is not None and peg.state == BROKEN and peg.value is not None else None


def through(pair: str, entry: Entry, status: str, peg: PegState | None) -> tuple[Entry, str]:
    """The entry serving `pair`, and its status, given the proxy's peg.

    An entry priced through the proxy (directly, BTC-USD from BTCUSDT, or by a cross rate leg)
    while its peg is broken is converted with the measured value: its value (and bid/ask)
    multiplied by it, its `route` ending in the peg's leg, marked derived, status `depeg`.
    Anything else is served as it is.
    """
    peg = broken(peg)
    if peg is None or peg.value is None or not entry.proxied:
        return entry, status
    value = _times(entry.value, peg.value)
    if value is None:  # cannot happen for a valid entry and a positive rate; never serve 0
        return entry, DEPEG
    legs = entry.route or (_market_leg(pair, peg, entry.provider, entry.value, entry.source_time),)
    converted = replace(
        entry,
        value=value,
        bid=_times(entry.bid, peg.value),
        ask=_times(entry.ask, peg.value),
        derived=True,
        route=(*legs, _peg_leg(peg, entry.source_time)),
    )
    return converted, DEPEG


def convert_answer(answer: dict[str, Any], power: int, peg: PegState | None) -> dict[str, Any]:
    """An on-demand answer (`/rates`, `/convert`) priced through the proxy `power` times (-1: the
    proxied leg divides), converted like `through` while the peg is broken."""
    peg = broken(peg)
    if peg is None or peg.value is None or power == 0:
        return answer
    value = _times(answer["value"], peg.value, power)
    if value is None:
        return answer
    route = answer["route"] or [
        _market_leg(answer["pair"], peg, answer["provider"], answer["value"], answer["source_time"])
    ]
    status = answer["status"] if answer["stale"] else DEPEG
    return {
        **answer,
        "value": value,
        "derived": True,
        "route": [*route, _peg_leg(peg, answer["source_time"])],
        "status": status,
    }
