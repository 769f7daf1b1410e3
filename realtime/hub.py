"""Local fan-out of events to this process's sockets (ARCHITECTURE: the hub).

The bridge hands every event to the hub once, as the JSON text frame already serialised. The hub
puts that same string into the bounded queue of each socket it concerns (rate events by pair,
everything else to all) and returns at once: it never awaits a socket. Each socket has its own
sender task. While a socket's rate updates wait unsent, a newer one for the same pair replaces
the older in place (the latest wins). A socket that stays behind (its queue full, or one send
blocked longer than `send_timeout`) is closed with 1013, so one slow client never delays the
others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from realtime import metrics

logger = logging.getLogger(__name__)

# Close code "Try Again Later" (RFC 6455 registry): the client fell behind.
CLOSE_TRY_AGAIN_LATER = 1013
QUEUE_LIMIT = 256
SEND_TIMEOUT_S = 5.0

SendText = Callable[[str], Awaitable[None]]
Close = Callable[[int], Awaitable[None]]


class SocketQueue:
    """One socket's end of the hub: a bounded, coalescing queue and the task that drains it."""

    def __init__(
        self,
        send: SendText,
        close: Close,
        *,
        pairs: set[str] | None,
        queue_limit: int | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self._send = send
        self._close = close
        self.pairs = pairs  # None: every active pair
        # Read at creation, not at import: tests and benchmarks tune the module values.
        self._queue_limit = QUEUE_LIMIT if queue_limit is None else queue_limit
        self._send_timeout = SEND_TIMEOUT_S if send_timeout is None else send_timeout
        # Entries are either a frame (str) or a pair whose latest frame waits in _rates.
        self._queue: deque[str | tuple[str]] = deque()
        self._rates: dict[str, str] = {}
        self._ready = asyncio.Event()
        self._sending_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.coalesced = 0
        self.sent = 0
        self.kicked = False

    def start(self) -> None:
        self._task = self._loop.create_task(self._drain())

    async def stop(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def stuck(self, now: float) -> bool:
        return self._sending_since is not None and now - self._sending_since > self._send_timeout

    def put(self, frame: str, pair: str | None = None) -> bool:
        """Queue a frame without waiting; False when the socket is behind and was closed."""
        if self.kicked:
            return False
        if self.stuck(self._loop.time()):
            self.kick(f"a send blocked for more than {self._send_timeout:.1f}s")
            return False
        if pair is not None:
            if pair in self._rates:
                self._rates[pair] = frame
                self.coalesced += 1
                metrics.WS_COALESCED.inc()
                return True
            if len(self._queue) >= self._queue_limit:
                self.kick("queue full")
                return False
            self._rates[pair] = frame
            self._queue.append((pair,))
        else:
            if len(self._queue) >= self._queue_limit:
                self.kick("queue full")
                return False
            self._queue.append(frame)
        self._ready.set()
        return True

    async def _drain(self) -> None:
        queue, rates = self._queue, self._rates
        while True:
            await self._ready.wait()
            self._ready.clear()
            while queue:
                entry = queue.popleft()
                frame = rates.pop(entry[0]) if isinstance(entry, tuple) else entry
                self._sending_since = self._loop.time()
                try:
                    await self._send(frame)
                except Exception as exc:
                    # The client went away mid-send; its disconnect event follows and cleans up.
                    logger.debug("ws: send failed, socket gone: %r", exc)
                    self.kicked = True
                    return
                self._sending_since = None
                self.sent += 1

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

    def publish(self, frame: str) -> int:
        """An event for every socket (item, provider, fetch, inbound)."""
        for socket in list(self._all):
            if not socket.put(frame):
                self.remove(socket)
        return len(self._all)

    def publish_rate(self, pair: str, frame: str) -> int:
        """A rate event: to the sockets subscribed to `pair` and those subscribed to all."""
        targets = self._wildcard.union(self._by_pair.get(pair, ()))
        for socket in targets:
            if not socket.put(frame, pair):
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
