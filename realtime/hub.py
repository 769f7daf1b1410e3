"""Local fan-out of events to this process's sockets (docs/architecture.md#inside-a-web-process).

The bridge hands every event to the hub once, as the JSON text frame already serialised. The hub
puts that same string into the bounded queue of each socket it concerns (rate events by pair,
everything else to all) and returns at once: it never waits for a socket. One callback at the
end of the loop's turn (`Writes`) then writes each socket's waiting frames, a socket at a time,
and no task wakes per socket and event (those wake-ups were a fifth of the fan-out's time:
docs/benchmarks.md#realtime-one-write-pass-per-loop-turn-2026-12-07). Under uvicorn, with no
extension negotiated, a frame's bytes on the wire are made once per pass and each socket's
waiting frames go to its transport in one write (`DirectWriter`; uvicorn's send framed the
text again for each socket and cost more than the write itself); otherwise, and whenever the
socket's write buffer is full, the server's send is used: it completes without suspending
while the client reads, so it is run by hand (`SocketQueue._pump`). A send that does suspend
(the client stopped reading and the server's buffer is full) hands the socket to a task of its
own, which finishes that send, drains what came meanwhile and hands the socket back.
While a socket is behind (its send blocked, or a quarter of its queue waiting), a newer rate
update for a pair replaces the older one still unsent (the latest wins); it takes its own place
at the end of the queue, so frames still leave in stream order and a client's last `seq` is a
safe place to resume from. A burst of events that merely arrives within one turn of the event
loop, before the writes, is not "behind": each of its updates is sent (a client that keeps up
loses none). A socket that stays behind (its queue full, or one send blocked longer than
`send_timeout`) is closed with 1013, so one slow client never delays the others.

Two things a socket may add, each costing nothing to sockets without it:
- a *prelude* (a resume: `?since=`): frames read from the stream and sent before anything live;
  meanwhile the hub's frames are held, then released minus those the prelude already covered
  (by `seq`), so the hand-over from replay to live has no duplicate and no gap;
- a *delivery policy* (`min_interval_ms`, `min_change`) applied to its rate updates here, at
  fan-out, where the pending latest update per pair already lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable
from decimal import Decimal
from typing import Any, Protocol

from realtime import metrics
from realtime.byhand import resume_suspended

logger = logging.getLogger(__name__)

# Close code "Try Again Later" (RFC 6455 registry): the client fell behind.
CLOSE_TRY_AGAIN_LATER = 1013
QUEUE_LIMIT = 256
# Frames waiting (out of QUEUE_LIMIT) from which a socket counts as behind and coalesces.
COALESCE_FRACTION = 4
SEND_TIMEOUT_S = 5.0

# Frames held while a prelude replays, before the socket is judged too far behind.
HELD_LIMIT_FACTOR = 16

# A coroutine, not any awaitable: the hub runs it by hand (`_pump`) until it first suspends.
SendText = Callable[[str], Coroutine[Any, Any, None]]
# A coroutine, not any awaitable: kick() runs it as a task of its own.
Close = Callable[[int], Coroutine[Any, Any, None]]
# (frame or None for a position marker, the stream sequence it covers or None)
Prelude = AsyncIterator[tuple[str | None, int | None]]
# What a delivery policy looks at in a rate update: (value, provider, status).
RateFacts = tuple[Any, Any, Any]


class DirectWriter(Protocol):
    """Writes whole WebSocket frames (`frame()` of a text: the same bytes for every socket)
    straight to one socket, when `ready()` says the server's send would write at once
    (`edge._uvicorn_compat.DirectWrite`)."""

    def frame(self, text: str) -> bytes: ...

    def ready(self) -> bool: ...

    def write(self, data: bytes) -> None: ...


class DeliveryPolicy:
    """One subscription's `min_interval_ms` / `min_change` (docs/events.md#delivery-policy) and its
    per-pair state.

    A rate update passes at once when it is the pair's first, or its provider or status differs
    from the last one delivered. Otherwise, with `min_change`, it is dropped unless the value
    moved by at least that fraction since the last delivered one or a heartbeat is due
    (`heartbeat_s` since the last delivery: the client still learns the pair is alive); and,
    with `min_interval`, one arriving sooner than the interval after the last delivery waits
    as the pair's pending update (a newer one replaces it) and goes when the interval ends.
    """

    __slots__ = ("heartbeat_s", "last", "min_change", "min_interval_s", "pending", "timers")

    def __init__(self, *, min_interval_s: float, min_change: Decimal, heartbeat_s: float) -> None:
        self.min_interval_s = min_interval_s
        self.min_change = min_change
        self.heartbeat_s = heartbeat_s
        # pair -> (value, provider, status, loop time delivered)
        self.last: dict[str, tuple[Any, Any, Any, float]] = {}
        self.pending: dict[str, tuple[str, RateFacts]] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def active(self) -> bool:
        return self.min_interval_s > 0 or self.min_change > 0

    def moved_enough(self, value: Any, last_value: Any) -> bool:
        if not isinstance(value, Decimal | int) or not isinstance(last_value, Decimal | int):
            return True  # a payload without a usable value is not ours to hold back
        if last_value == 0:
            return value != 0
        # As Decimals (exact for an int): abs() of a Decimal-or-int is typed as a bare object.
        return abs(Decimal(value) - last_value) >= self.min_change * abs(Decimal(last_value))

    def drop_pending(self, pair: str) -> None:
        self.pending.pop(pair, None)
        timer = self.timers.pop(pair, None)
        if timer is not None:
            timer.cancel()

    def cancel(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.pending.clear()


class Writes:
    """The sockets with frames waiting, written once per turn of the event loop.

    One callback for all sockets, not one per socket and event; and a burst of events (many
    arrive in one turn under load) leaves each socket's frames back to back, which costs the
    kernel less than going round every socket once per event (server CPU per delivery 1.0x the
    raw broadcast's this way, 1.5x written at each event: bench/bench_realtime.py).
    """

    def __init__(self) -> None:
        self._due: list[SocketQueue] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        # Each frame's bytes on the wire, made once per pass for all the sockets written
        # directly (a text is hashed once: the same string object comes from every queue).
        self.wire: dict[str, bytes] = {}

    def add(self, socket: SocketQueue, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # the first use, or another loop (only tests run several)
            self._due, self._loop, self._scheduled = [], loop, False
        self._due.append(socket)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        due, self._due, self._scheduled = self._due, [], False
        try:
            for socket in due:
                socket.write_due()
        finally:
            self.wire.clear()


writes = Writes()


class SocketQueue:
    """One socket's end of the hub: a bounded, coalescing queue, written to once per turn of the
    loop while the socket keeps up and by a task of its own while a send waits (or a resume
    replays).
    """

    def __init__(
        self,
        send: SendText,
        close: Close,
        *,
        pairs: set[str] | None,
        queue_limit: int | None = None,
        send_timeout: float | None = None,
        prelude: Prelude | None = None,
        policy: DeliveryPolicy | None = None,
        direct: DirectWriter | None = None,
    ) -> None:
        self._send = send
        # With `direct`, the write pass writes the waiting frames' bytes straight to the socket,
        # all in one write, while it is ready; `send` then serves only when it is not.
        self._direct = direct
        self._close = close
        self.pairs = pairs  # None: every active pair
        # Read at creation, not at import: tests and benchmarks tune the module values.
        self._queue_limit = QUEUE_LIMIT if queue_limit is None else queue_limit
        self._send_timeout = SEND_TIMEOUT_S if send_timeout is None else send_timeout
        self._coalesce_after = self._queue_limit // COALESCE_FRACTION
        # Entries are either a frame (str) or (pair, token): the pair's latest frame waits in
        # _rates with its token; an entry whose token is no longer there was superseded.
        self._queue: deque[str | tuple[str, int]] = deque()
        self._rates: dict[str, tuple[str, int]] = {}
        self._token = 0
        self._stale = 0  # superseded entries still in the queue
        # True while something else owns the writes: before start(), while the pump sends, while
        # the task runs (a replay, or a send that suspended), and for good once the send failed.
        self._busy = True
        self._due = False  # in `writes`, to be written at the end of this turn
        self._sending_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.coalesced = 0
        self.sent = 0
        self.kicked = False
        self._prelude = prelude
        # While the prelude runs, the hub's frames wait here: (frame, pair, seq, rate facts).
        self._held: list[tuple[str, str | None, int | None, RateFacts | None]] | None = (
            [] if prelude is not None else None
        )
        self.policy = policy if policy is not None and policy.active else None
        # `expand=sources`: this subscriber's rate updates keep their `sources`.
        self.expand = False

    @property
    def writes_directly(self) -> bool:
        return self._direct is not None

    def start(self) -> None:
        """Frames put before now leave now (a resume's replay first, in a task)."""
        if self._prelude is not None:
            self._task = self._loop.create_task(self._drain(None))
            return
        self._busy = False
        self._wake()

    def set_policy(self, policy: DeliveryPolicy | None) -> None:
        if self.policy is not None:
            self.policy.cancel()
        self.policy = policy if policy is not None and policy.active else None

    async def stop(self) -> None:
        self._busy = True  # nothing is written any more, not even frames due this turn
        if self.policy is not None:
            self.policy.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def stuck(self, now: float) -> bool:
        return self._sending_since is not None and now - self._sending_since > self._send_timeout

    def put(
        self,
        frame: str,
        pair: str | None = None,
        seq: int | None = None,
        rate: RateFacts | None = None,
    ) -> bool:
        """Queue a frame without waiting; False when the socket is behind and was closed.

        `pair` marks a rate update (coalesced per pair), `seq` its stream sequence (to match a
        resume's replay), `rate` the facts a delivery policy judges it by.
        """
        if self.kicked:
            return False
        if self._held is not None:
            if len(self._held) >= self._queue_limit * HELD_LIMIT_FACTOR:
                self.kick("too many live events while replaying")
                return False
            self._held.append((frame, pair, seq, rate))
            return True
        if pair is not None and self.policy is not None and rate is not None:
            return self._put_by_policy(frame, pair, rate)
        return self._put_now(frame, pair)

    def _put_by_policy(self, frame: str, pair: str, rate: RateFacts) -> bool:
        policy = self.policy
        assert policy is not None
        now = self._loop.time()
        value, provider, status = rate
        last = policy.last.get(pair)
        if last is not None and provider == last[1] and status == last[2]:
            if (
                policy.min_change > 0
                and now - last[3] < policy.heartbeat_s
                and not policy.moved_enough(value, last[0])
            ):
                # The client's value is within the fraction of the truth: nothing to report,
                # and an older pending update is no longer the latest either.
                policy.drop_pending(pair)
                return True
            if policy.min_interval_s > 0 and now - last[3] < policy.min_interval_s:
                policy.pending[pair] = (frame, rate)
                if pair not in policy.timers:
                    policy.timers[pair] = self._loop.call_at(
                        last[3] + policy.min_interval_s, self._release, pair
                    )
                return True
        policy.drop_pending(pair)
        policy.last[pair] = (value, provider, status, now)
        return self._put_now(frame, pair)

    def _release(self, pair: str) -> None:
        """A pair's interval ended: its pending update (the latest) goes now."""
        policy = self.policy
        if policy is None or self.kicked:
            return
        policy.timers.pop(pair, None)
        pending = policy.pending.pop(pair, None)
        if pending is None:
            return
        frame, (value, provider, status) = pending
        policy.last[pair] = (value, provider, status, self._loop.time())
        self._put_now(frame, pair)

    def _put_now(self, frame: str, pair: str | None, *, bounded: bool = True) -> bool:
        if self.stuck(self._loop.time()):
            self.kick(f"a send blocked for more than {self._send_timeout:.1f}s")
            return False
        if pair is not None:
            self._token += 1
            if pair in self._rates:
                if not self._behind():
                    # The pair's older update stays queued as it is; this one goes after it.
                    return self._put_plain(frame, bounded)
                self._rates[pair] = (frame, self._token)
                self._queue.append((pair, self._token))
                self._stale += 1
                self.coalesced += 1
                metrics.WS_COALESCED.inc()
                if self._stale > self._queue_limit * 4:
                    self._compact()
                self._wake()
                return True
            if bounded and len(self._queue) - self._stale >= self._queue_limit:
                self.kick("queue full")
                return False
            self._rates[pair] = (frame, self._token)
            self._queue.append((pair, self._token))
            self._wake()
            return True
        return self._put_plain(frame, bounded)

    def _put_plain(self, frame: str, bounded: bool) -> bool:
        if bounded and len(self._queue) - self._stale >= self._queue_limit:
            self.kick("queue full")
            return False
        self._queue.append(frame)
        self._wake()
        return True

    def _behind(self) -> bool:
        """A send is blocked (the client does not read) or many frames wait unsent."""
        return (
            self._sending_since is not None
            or len(self._queue) - self._stale >= self._coalesce_after
        )

    def _compact(self) -> None:
        """Drop superseded entries (a client stuck in one send while one pair streams)."""
        rates = self._rates
        self._queue = deque(
            e for e in self._queue if isinstance(e, str) or rates.get(e[0], ("", 0))[1] == e[1]
        )
        self._stale = 0

    def _next_frame(self) -> str | None:
        """The queue's next frame to send; None for a superseded entry (skipped)."""
        entry = self._queue.popleft()
        if isinstance(entry, str):
            return entry
        latest = self._rates.get(entry[0])
        if latest is None or latest[1] != entry[1]:
            self._stale -= 1
            return None
        return self._rates.pop(entry[0])[0]

    def _frames(self) -> Generator[str, None, None]:
        """Every frame waiting, taken from the queue (superseded entries skipped)."""
        queue = self._queue
        while queue:
            frame = self._next_frame()
            if frame is not None:
                yield frame

    def _wake(self) -> None:
        """Frames wait: to be written at the end of this turn, unless a task owns the writes."""
        if not self._busy and not self._due and self._queue:
            self._due = True
            writes.add(self, self._loop)

    def write_due(self) -> None:
        """`writes` calls this once per turn in which frames were put."""
        self._due = False
        self._pump()

    def _pump(self) -> None:
        """Send what waits, here and now, while each send completes without suspending.

        With a direct writer that is ready, every waiting frame's bytes (made once per pass for
        all sockets) go in one write. Otherwise through the server's send: a coroutine that only
        suspends when the client stopped reading; run by hand, it costs a call, not a task's
        wake-up. One that suspends is finished by a task (`_drain`), which owns the socket's
        writes until the queue is empty.
        """
        if self._busy or self.kicked:
            return  # not started, replaying, a task is sending, this very pump, or closed
        queue = self._queue
        direct = self._direct
        if direct is not None and direct.ready():
            cache = writes.wire
            data = []
            for text in self._frames():
                wire = cache.get(text)
                if wire is None:
                    wire = cache[text] = direct.frame(text)
                data.append(wire)
            if data:
                direct.write(data[0] if len(data) == 1 else b"".join(data))
                self.sent += len(data)
            return
        self._busy = True
        while queue:
            frame = self._next_frame()
            if frame is None:
                continue
            send = self._send(frame)
            try:
                awaiting = send.send(None)
            except StopIteration:
                self.sent += 1
                continue
            except Exception as exc:
                # The client went away mid-send; its disconnect event follows and cleans up.
                logger.debug("ws: send failed, socket gone: %r", exc)
                self.kicked = True
                return
            self._sending_since = self._loop.time()
            self._task = self._loop.create_task(self._drain(resume_suspended(send, awaiting)))
            return
        self._busy = False

    async def _drain(self, suspended: Awaitable[None] | None) -> None:
        """The socket's writes while a send waits or a resume replays; ends with the queue empty,
        handing the socket back to `_pump`."""
        if self._prelude is not None and not await self._run_prelude(self._prelude):
            return
        try:
            if suspended is not None:
                await suspended
                self._sending_since = None
                self.sent += 1
            while self._queue:
                frame = self._next_frame()
                if frame is None:
                    continue
                await self._send_watched(frame)
        except Exception as exc:
            # The client went away mid-send; its disconnect event follows and cleans up.
            logger.debug("ws: send failed, socket gone: %r", exc)
            self.kicked = True
            return
        # No await since the queue was last seen empty: nothing can have slipped in between.
        self._task = None
        self._busy = False

    async def _send_watched(self, frame: str) -> None:
        """One send in the task, timed for `stuck()` while it waits."""
        self._sending_since = self._loop.time()
        await self._send(frame)
        self._sending_since = None
        self.sent += 1

    async def _run_prelude(self, prelude: Prelude) -> bool:
        """Send the replayed frames, then release the held live ones it did not cover."""
        covered: int | None = None
        try:
            async for frame, seq in prelude:
                if seq is not None and (covered is None or seq > covered):
                    covered = seq
                if frame is None:
                    continue
                await self._send_watched(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("ws: send failed during replay, socket gone: %r", exc)
            self.kicked = True
            return False
        finally:
            self._prelude = None
            aclose = getattr(prelude, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        held, self._held = self._held or [], None
        # No await from here on: the hand-over is atomic with respect to the hub.
        for frame, pair, seq, rate in held:
            if seq is not None and covered is not None and seq <= covered:
                continue  # the replay already sent it (or it predates the replay's snapshot)
            if pair is not None and self.policy is not None and rate is not None:
                self._put_by_policy(frame, pair, rate)
            else:
                # Each held frame goes as it came: they were held for the hand-over, not because
                # the client fell behind, so none coalesces; they were bounded while held.
                self._put_now(frame, None, bounded=False)
        return not self.kicked

    def kick(self, why: str) -> None:
        """Close with 1013: this socket fell behind."""
        if self.kicked:
            return
        self.kicked = True
        metrics.WS_SLOW_DISCONNECTS.inc()
        logger.info("ws: closing a slow client (%s, %d queued)", why, len(self._queue))
        if self._task is not None:
            self._task.cancel()
        # Keep a reference: the loop holds tasks weakly, and the close must not be collected.
        self._closing = self._loop.create_task(self._close(CLOSE_TRY_AGAIN_LATER))


class Hub:
    """pair -> sockets; `publish*` are sync and O(number of sockets concerned)."""

    def __init__(self) -> None:
        self._all: set[SocketQueue] = set()
        self._wildcard: set[SocketQueue] = set()
        self._by_pair: dict[str, set[SocketQueue]] = {}
        self._watchdog: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._all)

    def sockets(self) -> list[SocketQueue]:
        return list(self._all)

    def add(self, socket: SocketQueue) -> None:
        self._all.add(socket)
        self._index(socket)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Close sockets whose send stays blocked even when no new event arrives for them.

        One task per process scanning every socket a few times per send timeout: far cheaper
        than a timer per send. It ends with the last socket and restarts with the next.
        """
        loop = asyncio.get_running_loop()
        while self._all:
            await asyncio.sleep(SEND_TIMEOUT_S / 4)
            now = loop.time()
            for socket in [s for s in self._all if s.stuck(now)]:
                socket.kick(f"a send blocked for more than {SEND_TIMEOUT_S:.1f}s")
                self.remove(socket)

    def remove(self, socket: SocketQueue) -> None:
        self._all.discard(socket)
        self._unindex(socket)

    def set_pairs(self, socket: SocketQueue, pairs: Iterable[str] | None) -> None:
        self._unindex(socket)
        socket.pairs = None if pairs is None else set(pairs)
        if socket in self._all:
            self._index(socket)

    def publish(self, frame: str, seq: int | None = None) -> int:
        """An event for every socket (item, provider, fetch, inbound)."""
        for socket in list(self._all):
            if not socket.put(frame, None, seq):
                self.remove(socket)
        return len(self._all)

    def publish_rate(
        self,
        pair: str,
        frame: str,
        seq: int | None = None,
        rate: RateFacts | None = None,
        lean: str | None = None,
    ) -> int:
        """A rate event: to the sockets subscribed to `pair` and those subscribed to all;
        `lean` is the frame without `sources`, for the sockets that did not ask to expand."""
        targets = self._wildcard.union(self._by_pair.get(pair, ()))
        for socket in targets:
            sent = frame if lean is None or socket.expand else lean
            if not socket.put(sent, pair, seq, rate):
                self.remove(socket)
        return len(targets)

    def _index(self, socket: SocketQueue) -> None:
        if socket.pairs is None:
            self._wildcard.add(socket)
            return
        for pair in socket.pairs:
            self._by_pair.setdefault(pair, set()).add(socket)

    def _unindex(self, socket: SocketQueue) -> None:
        self._wildcard.discard(socket)
        for pair in socket.pairs or ():
            members = self._by_pair.get(pair)
            if members is not None:
                members.discard(socket)
                if not members:
                    del self._by_pair[pair]


hub = Hub()
