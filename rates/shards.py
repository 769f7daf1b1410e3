"""Sharded ownership of live state (docs/architecture.md#sharded-ownership).

With `KURS_OWNER_SHARDS` = N > 1 the tracked items are split into N shards by a stable function
of the item's code (`shard_of`: CRC-32 of the code, modulo N), and each shard has its own lease
row (`rates.lease`, the same TTL, renewal and safety rules). A `run_fetch --watch` process owns
the shards whose leases it holds: it writes current rates, history, the served log and outbox
rows only for their pairs, though it quotes every cross-rate leg they need, whichever shard the
leg's own item belongs to, and tracks which providers a consensus leaves out of its pairs
(`rates.provider_health`: one exclusion per provider and shard). Shard 0's holder also does the
global duties (peg events and states, provider statuses and `provider.state` events).

With N = 1 there is one lease, named as before shards (`live-rates`), and every check here
answers as if shards did not exist.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import zlib
from collections.abc import Iterable
from contextlib import suppress

from django.conf import settings
from django.db import DatabaseError

from rates.board import QuoteBoard
from rates.lease import (
    LIVE_RATES,
    Lease,
    lease_holder,
    lease_release,
    lease_try_acquire,
    live_names,
)
from realtime import nats

# The fetching process logs under one name, whichever of its modules speaks.
logger = logging.getLogger("rates.fetcher")

# The shard whose holder does the global duties: it always exists, whatever N.
GLOBAL_SHARD = 0
# A process that owns a shard takes another free one only once it has seen it free this long:
# a standby (which takes a free shard at its next try, every second) or a fetcher just
# starting gets it first, so that owners share the shards instead of one taking them all.
SECOND_SHARD_GRACE = 2.0
# Each fetcher's presence row (a lease of its own, in the same table): how many share the shards.
PRESENCE = f"{LIVE_RATES}/seen/"


def shard_count() -> int:
    return int(settings.KURS_OWNER_SHARDS)


def shard_of(code: str, count: int | None = None) -> int:
    """The shard of a pair: CRC-32 of its code, modulo the shard count. Stable across processes,
    hosts and restarts (unlike `hash`, salted per process) and independent of item ids, so every
    process agrees and a pair stays in its shard while N is unchanged."""
    count = shard_count() if count is None else count
    if count == 1:
        return 0
    return zlib.crc32(code.upper().encode()) % count


def lease_name(shard: int, count: int | None = None) -> str:
    """The lease row of a shard; with one shard the lease of before shards (`live-rates`)."""
    count = shard_count() if count is None else count
    return LIVE_RATES if count == 1 else f"{LIVE_RATES}/{shard}of{count}"


def event_shard(subject: str, payload: str, count: int | None = None) -> int:
    """The shard an outbox row belongs to: that of the pair it is about (`<prefix>.rates.<pair>`,
    or its data's `direction` or `code`); an event about no pair belongs to the global shard."""
    count = shard_count() if count is None else count
    if count == 1:
        return 0
    rates = f"{settings.KURS_NATS_PREFIX}.rates."
    if subject.startswith(rates):
        return shard_of(subject[len(rates) :], count)
    try:
        data = json.loads(payload).get("data") or {}
    except (ValueError, AttributeError):
        return GLOBAL_SHARD
    code = data.get("direction") or data.get("code") if isinstance(data, dict) else None
    return shard_of(code, count) if isinstance(code, str) else GLOBAL_SHARD


class Shards:
    """This process's leases, one per shard, under one holder name.

    `take` renews the leases held and takes free ones. Owners share the shards: each process
    (owner or standby) renews a presence row beside the leases, and a process takes a free shard
    at once while it holds fewer than its fair share, ceil(N / processes present); at or above
    it, only once the shard was seen free for `SECOND_SHARD_GRACE` (a peer below its share gets
    it first). An owner above its share gives shards up (`surplus`) so that a standby or a
    fetcher just started gets them. What an owner serves is a fixed set of shards (`owned`,
    decided by the fetcher from `take`); `held(owned)` is the cheap check before every write:
    each of their leases still valid by this process's own deadline.
    """

    def __init__(self, *, count: int | None = None, holder: str | None = None) -> None:
        self.count = shard_count() if count is None else count
        first = Lease(holder=holder, name=lease_name(0, self.count))
        self.holder = first.holder
        self.leases = [first] + [
            Lease(holder=self.holder, name=lease_name(shard, self.count))
            for shard in range(1, self.count)
        ]
        # The presence row: its name must be unique per process and fit the column (32).
        self._presence = f"{PRESENCE}{uuid.uuid4().hex[:12]}"
        self._free_since: dict[int, float] = {}
        self.fair = self.count
        self._foreign_logged = False

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def held(self, owned: Iterable[int]) -> bool:
        return all(self.leases[shard].held() for shard in owned)

    def take(self, *, greedy: bool = False) -> frozenset[int]:
        """Renew what is held, take what is free (sync; DatabaseError passes up). With `greedy`
        (the safety net's one cycle), every free shard at once."""
        held = set()
        for shard, lease in enumerate(self.leases):
            if lease.epoch is not None and lease.try_acquire():
                held.add(shard)
        if self.sharded and not greedy:
            present = self._present()
            if present is None:
                return frozenset(held)
            self.fair = -(-self.count // present)
        for shard, lease in enumerate(self.leases):
            if shard in held:
                continue
            if not greedy and len(held) >= self.fair and not self._free_long_enough(shard):
                continue
            if lease.try_acquire():
                held.add(shard)
                self._free_since.pop(shard, None)
        return frozenset(held)

    def surplus(self, owned: Iterable[int]) -> frozenset[int]:
        """The shards to give up to reach the fair share (the last `take` measured it): the
        highest-numbered first, the global shard last."""
        extra = len(list(owned)) - self.fair
        if extra <= 0:
            return frozenset()
        return frozenset(sorted(owned, key=lambda shard: (shard == GLOBAL_SHARD, -shard))[:extra])

    def _present(self) -> int | None:
        """Renew this process's presence row; how many processes' rows are live (at least 1).
        None, to take no new shard: the database is away, or a lease of another shard count is
        live (fetchers with another KURS_OWNER_SHARDS would own the same pairs)."""
        try:
            lease_try_acquire(holder=self.holder, name=self._presence)
            names = live_names(prefix=LIVE_RATES, forget=PRESENCE)
        except DatabaseError:
            return None
        mine = {lease.name for lease in self.leases}
        foreign = sorted(n for n in names if n not in mine and not n.startswith(PRESENCE))
        if foreign:
            if not self._foreign_logged:
                logger.error(
                    "KURS_OWNER_SHARDS is %d here, but %s is held: fetchers with another shard "
                    "count own live state; this one takes no shard until they stop",
                    self.count,
                    ", ".join(foreign),
                )
                self._foreign_logged = True
            return None
        self._foreign_logged = False
        return max(1, sum(1 for n in names if n.startswith(PRESENCE)))

    def _free_long_enough(self, shard: int) -> bool:
        try:
            holder = lease_holder(name=self.leases[shard].name)
        except DatabaseError:
            return False  # the renewals above said what the database allows; try again later
        if holder is not None:
            self._free_since.pop(shard, None)
            return False
        now = time.monotonic()
        since = self._free_since.setdefault(shard, now)
        return now - since >= SECOND_SHARD_GRACE

    def renew(self, owned: Iterable[int]) -> bool:
        """Renew the leases of `owned` (sync); False when any of them is lost."""
        return all([self.leases[shard].try_acquire() for shard in owned])

    def release(self, shards: Iterable[int] | None = None) -> None:
        for shard in range(self.count) if shards is None else shards:
            self.leases[shard].release()
        if shards is None and self.sharded:
            with suppress(DatabaseError):
                lease_release(holder=self.holder, name=self._presence)

    def epochs(self, owned: Iterable[int]) -> str:
        return ", ".join(f"{shard}:{self.leases[shard].epoch}" for shard in sorted(owned))


def describe(owned: Iterable[int], count: int) -> str:
    """`shards 0, 2 of 4` for the logs (empty with one shard: the log lines of before shards)."""
    if count == 1:
        return ""
    return f"shards {', '.join(str(shard) for shard in sorted(owned))} of {count}"


def own(board: QuoteBoard, shards: Shards, owned: frozenset[int]) -> None:
    """Point the board at the pairs of `owned` (its items, its loads) and the outbox relay at
    their events; the caller loads the board and sets its guard. Nothing with one shard."""
    if not shards.sharded:
        return
    count = shards.count
    board.owns = lambda code: shard_of(code, count) in owned
    board.duty = lambda: GLOBAL_SHARD in owned
    board.shards = owned
    nats.relay_only(lambda subject, payload: event_shard(subject, payload, count) in owned)


def disown(board: QuoteBoard) -> None:
    """Undo `own` (the caller has stopped the board's writes): every pair and row again."""
    if board.owns is None and board.duty is None:
        return
    board.owns = board.duty = None
    board.shards = None
    nats.relay_only(None)
