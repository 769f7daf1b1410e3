"""How a WebSocket or SSE connection starts: a snapshot, a replay, or a `gap` and a snapshot.

Shared by `realtime.consumers` and `realtime.sse` so both doors bound a resume alike:
- no `since`: the subscription's snapshot;
- `since` with an `epoch` other than the stream's: `gap` and a snapshot (`bridge.replay` checks
  it against the stream itself; a `since` without `epoch` is taken as a sequence of the current
  stream, as before epochs);
- `since` at most KURS_MAX_REPLAY_EVENTS stream events behind: the replay of what was missed
  (`bridge.replay`), holding one of the client's KURS_MAX_REPLAYS_PER_CLIENT replay slots until
  it has been read and sent;
- further behind: `gap` (`first_available`: the oldest sequence this server would replay from
  now) and a fresh snapshot, at the cost of a new connection. The client needs the current state,
  which one snapshot gives; replaying hours of a 24 h stream event by event gave it nothing more
  at about 70 µs of the web process's CPU per event read (`bench/bench_replay.py`: 30 resumes
  of 8,700 events took 18.3 s of CPU; 30 that get a gap, 0.09 s). 1,000 events cover minutes
  of a normal stream (a heartbeat per pair every 15 s, more while prices move), what a client
  that dropped and reconnects misses, for about 70 ms of CPU.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from realtime.bridge import bridge
from realtime.frames import gap_frame
from realtime.hub import Prelude
from realtime.limits import (
    CONNECTION_RETRY_AFTER_S,
    REPLAY_RETRY_AFTER_S,
    Lease,
    caps,
    replay_bound,
    too_many_connections,
    too_many_replays,
)


@dataclass(frozen=True, slots=True)
class Start:
    since: int | None
    # The stream `since` was read in (None: not given).
    epoch: str | None = None
    # Set when a resume is too far behind to replay: the gap's `first_available`.
    gap_from: int | None = None

    @property
    def replays(self) -> bool:
        return self.since is not None and self.gap_from is None


def plan(since: int | None, epoch: str | None = None) -> Start:
    if since is None:
        return Start(None)
    return Start(since, epoch, replay_bound(since, bridge.last_seq))


class Refused(Exception):
    """Over a per-client cap: `detail` says which; `replays` tells the two caps apart."""

    def __init__(self, detail: str, *, replays: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.replays = replays
        self.retry_after = REPLAY_RETRY_AFTER_S if replays else CONNECTION_RETRY_AFTER_S


def admit(client: str | None, start: Start) -> tuple[Lease, Lease | None]:
    """The connection's slot and, when it replays, its replay slot; Refused over a cap."""
    connection = caps.connection(client)
    if connection is None:
        raise Refused(too_many_connections(client), replays=False)
    replay = None
    if start.replays:
        replay = caps.replay(client)
        if replay is None:
            connection.release()
            raise Refused(too_many_replays(client), replays=True)
    return connection, replay


def first_frames(start: Start, pairs: set[str] | None, *, expand: bool = False) -> list[str]:
    """What the connection's queue gets before `hub.add()` (nothing when it replays). Called with
    no await before `hub.add()`, so the snapshot's `seq` is exactly where live frames begin."""
    if start.replays:
        return []
    snapshot = bridge.snapshot_frame(pairs, expand=expand)
    if start.since is None:
        return [snapshot]
    return [gap_frame(start.since, start.gap_from, bridge.epoch), snapshot]


def replay(start: Start, pairs: Callable[[], set[str] | None], slot: Lease) -> Prelude:
    """The replay the queue runs first (`start.replays`); it frees `slot` once it is over."""
    assert start.since is not None
    return _leased(bridge.replay(start.since, start.epoch, pairs), slot)


async def _leased(
    replay: AsyncIterator[tuple[str | None, int | None]], slot: Lease
) -> AsyncIterator[tuple[str | None, int | None]]:
    try:
        async for item in replay:
            yield item
    finally:
        slot.release()
        # Closed here, not left to the collector: it removes the replay's JetStream consumer.
        aclose = getattr(replay, "aclose", None)
        if aclose is not None:
            await aclose()
