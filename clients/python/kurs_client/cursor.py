"""What a resuming client has seen, and which frames it may hand on (docs/events.md).

Pure rules, no I/O: the stream feeds every frame of every connection through one `Cursor`.

- `seq` is the resume point: the last numbered frame handed on. A numbered frame at or below it
  is a duplicate (a replay overlapping what was seen) and is dropped. A `seq` lower than the
  previous one *on the same connection* means the server's stream was made anew (its numbers
  start again): the cursor follows the new numbers.
- `epoch` names the stream `seq` belongs to: taken from each snapshot (the server says it there
  and on `gap`, not on every event) and sent back on a resume, so a `seq` of a stream deleted and
  made again since is answered with `gap` and a snapshot, not with the new stream's events under
  the same numbers. When the numbers start again under a live connection, the new stream's epoch
  is not known until the next snapshot: the cursor forgets the old one, and the resume sends
  `since` alone, which the server takes as a sequence of its current stream.
- `version` orders each pair's rate updates: a `rate.updated` whose version is not newer than
  the last one handed on for its pair is dropped, whichever path brought it (a replay, the
  unnumbered fallback while NATS is down, two web processes).
- A server `gap` frame is held until the snapshot that follows it, then handed on as one `gap`
  event carrying that snapshot.
- `tick` and `pong` are heartbeats, never handed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kurs_client.models import Event, Gap, ItemDeleted, RateUpdate, Snapshot

HEARTBEATS = frozenset({"tick", "pong"})


@dataclass
class Dropped:
    """Frames the cursor refused, by reason (what the server repeated or reordered)."""

    duplicate_seq: int = 0
    old_version: int = 0


@dataclass
class Cursor:
    last_seq: int | None = None
    epoch: str | None = None
    versions: dict[str, int] = field(default_factory=dict)
    dropped: Dropped = field(default_factory=Dropped)
    _connection_seq: int | None = None
    _gap: Mapping[str, Any] | None = None

    def connected(self) -> None:
        """A new connection: its numbers are compared with the resume point afresh."""
        self._connection_seq = None
        self._gap = None

    def accept(self, envelope: Mapping[str, Any]) -> Event | None:
        """The event to hand on for this frame, or None."""
        kind = envelope.get("type")
        if kind in HEARTBEATS:
            return None
        if kind == "gap":
            self._gap = envelope
            return None
        seq = envelope.get("seq")
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        if kind == "snapshot":
            return self._snapshot(envelope, seq)
        if seq is not None and not self._new_seq(seq):
            self.dropped.duplicate_seq += 1
            return None
        event = Event.from_envelope(envelope)
        if isinstance(event.data, RateUpdate):
            if not self._newer(event.data.direction, event.data.version):
                self.dropped.old_version += 1
                return None
        elif isinstance(event.data, ItemDeleted):
            # The pair's versions start again if an item of that code is made anew.
            self.versions.pop(event.data.code, None)
        return event

    def _new_seq(self, seq: int) -> bool:
        previous = self._connection_seq
        if previous is not None and seq < previous:
            # The stream was made anew: follow its numbers, whose epoch the server has not said.
            self.last_seq = None
            self.epoch = None
        elif seq == previous or (self.last_seq is not None and seq <= self.last_seq):
            return False
        self._connection_seq = seq
        self.last_seq = seq
        return True

    def _newer(self, direction: str, version: int) -> bool:
        if version <= self.versions.get(direction, -1):
            return False
        self.versions[direction] = version
        return True

    def _snapshot(self, envelope: Mapping[str, Any], seq: int | None) -> Event:
        """A snapshot is the state itself: it is always handed on (as the data of a `gap` when
        one preceded it), its seq becomes the resume point and its versions the floor."""
        event = Event.from_envelope(envelope)
        assert isinstance(event.data, Snapshot)
        for course in event.data.courses:
            self.versions[course.direction] = max(
                course.version, self.versions.get(course.direction, -1)
            )
        if seq is not None:
            self.last_seq = seq
            self._connection_seq = seq
            # None from a server without epochs: a resume sends `since` alone, as before.
            self.epoch = event.epoch
        gap, self._gap = self._gap, None
        if gap is None:
            return event
        held = Gap.from_json(gap.get("data") or {})
        return Event(
            type="gap",
            data=Gap(since=held.since, first_available=held.first_available, snapshot=event.data),
            seq=seq,
            ts=event.ts,
            id=event.id,
            epoch=event.epoch,
        )
