"""The process's one NATS connection: its thread, its loop, its reconnections, its stream.

Every process (web, fetcher, qcluster worker, a management command) owns at most one nats-py
connection. It lives on its own event loop in a daemon thread ("kurs-nats"), so that code in any
thread, sync or async, can use it without an event loop of its own. It reconnects forever, keeps
plain subscriptions across reconnections, and on every (re)connection ensures the JetStream
stream where the server has JetStream.

What else lives on the connection (the outbox of `realtime.nats.publishing`, the stream consumer
of `realtime.nats.stream`) registers as a `Part` and hears its lifecycle: the connection knows
none of them. They, `StreamCursor` and `request()` use only the public surface below: `client`,
`loop`, `prefix`, `jetstream`, `submit()`, `on_loop()`, `note_error()`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from django.conf import settings
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from realtime import metrics
from realtime.nats.subjects import event_subjects, stream_name

T = TypeVar("T")
logger = logging.getLogger("realtime.nats")

STREAM_MAX_AGE_S = 24 * 3600
# How long the stream remembers a `Nats-Msg-Id` to drop a re-sent event (the relay's re-sends
# after a reconnection or a take-over): docs/events.md#no-lost-event.
STREAM_DUPLICATE_WINDOW_S = 10 * 60
# A stream check that timed out (a cluster electing its JetStream leaders after losing a node)
# is tried again this often while connected.
STREAM_RECHECK_S = 2.0
# JetStream's "not enabled" error codes (the server or the account has none).
JS_NOT_ENABLED = {10039, 10076}
# "No suitable peers for placement": a cluster whose nodes have not all joined yet (or are
# down) cannot place the replicas asked for now; tried again like a check that timed out.
JS_NO_PEERS_YET = 10005
# Reconnect back-off: doubling from RECONNECT_BASE_S up to RECONNECT_MAX_S, with jitter so that
# many processes do not hammer a restarted server in step.
RECONNECT_BASE_S = 0.1
RECONNECT_MAX_S = 2.0
CONNECT_TIMEOUT_S = 2
SHUTDOWN_TIMEOUT_S = 5.0
JETSTREAM_TIMEOUT_S = 2.0

MessageCallback = Callable[[Msg], Awaitable[None]]


class StreamUnavailable(Exception):
    """The stream cannot be read now (not connected, or the server has no JetStream)."""


class Part:
    """Something that lives on the connection and follows its lifecycle (no-ops by default).

    The hooks run on the connection's loop, in registration order, except `forget_after_fork`
    (in a forked child) and `status` (any thread).
    """

    def loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        """The connection's loop is about to run: make its tasks and asyncio objects now."""

    async def connected(self) -> None:
        """Connected or reconnected: runs before `NatsConnection.connected` is set."""

    def ready(self) -> None:
        """`NatsConnection.connected` was just set."""

    async def closing(self) -> None:
        """Shutdown, before the connection drains: flush, end subscriptions."""

    async def closed(self) -> None:
        """Shutdown, after the connection drained."""

    def stopped(self) -> None:
        """`shutdown()` ended (or found nothing started), in the caller's thread: forget what
        this process did, so that a later `start()` begins as a fresh process's would."""

    def forget_after_fork(self) -> None:
        """In a forked child: drop what belonged to the parent's connection."""

    def status(self) -> dict[str, Any]:
        """Fields this part adds to the health check's NATS status."""
        return {}


def stream_config(prefix: str) -> StreamConfig:
    """The replay stream as Kurs wants it: reconciled on every connection (docs/events.md#nats)."""
    return StreamConfig(
        name=stream_name(prefix),
        subjects=event_subjects(prefix),
        max_age=STREAM_MAX_AGE_S,
        num_replicas=settings.KURS_NATS_REPLICAS,
        duplicate_window=STREAM_DUPLICATE_WINDOW_S,
    )


def stream_differences(have: StreamConfig, want: StreamConfig) -> list[str]:
    """The fields Kurs sets that differ between the server's stream and `want`."""
    fields = ("subjects", "max_age", "num_replicas", "duplicate_window")
    return [name for name in fields if getattr(have, name) != getattr(want, name)]


def _reconnect_delay(attempts: int) -> float:
    ceiling = min(RECONNECT_MAX_S, RECONNECT_BASE_S * (2 ** min(attempts, 16)))
    return float(ceiling * random.uniform(0.5, 1.0))


class NatsConnection:
    """One managed connection: reconnects forever, logs its callbacks, drains on shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._parts: list[Part] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._subscriptions: dict[int, tuple[str, MessageCallback]] = {}
        self._live_subs: dict[int, Any] = {}
        self._next_sub_id = 0
        self._servers: list[str] = []
        self._prefix = ""
        self._state = "not_started"
        self._jetstream: bool | None = None
        self._last_error: str | None = None
        self._last_logged_error: str | None = None
        self._errors = 0
        self._sub_lock: asyncio.Lock | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self._reconciled_at = -STREAM_RECHECK_S  # loop time of the last check after a refusal
        self._first_attempt: asyncio.Event | None = None
        self._started_at = 0.0
        # Set while connected with every registered subscription applied.
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        # Set once the JetStream stream was ensured, or found unsupported, on this connection.
        self.stream_checked = threading.Event()

    # --- the public surface ---------------------------------------------------------------
    @property
    def client(self) -> Client | None:
        """The nats-py client, to be used on `loop` only; None before `start()`."""
        return self._client

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The connection's event loop (thread "kurs-nats"); None while not started."""
        return self._loop

    @property
    def prefix(self) -> str:
        """The subject prefix this connection was started with (`KURS_NATS_PREFIX`)."""
        return self._prefix

    @property
    def jetstream(self) -> bool | None:
        """Whether the server has JetStream and the stream exists; None until known."""
        return self._jetstream

    @property
    def errors(self) -> int:
        """Errors noted since `start()`."""
        return self._errors

    def is_connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected

    def add_part(self, part: Part) -> None:
        """Register `part` for the lifecycle hooks (once, at import of its module)."""
        self._parts.append(part)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Schedule `coro` on the connection's loop from any thread (starts the connection)."""
        self.start()
        loop = self._loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(coro, loop)

    async def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the connection's loop and wait for it from the caller's loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise StreamUnavailable("NATS connection not started")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the connection's loop soon (thread-safe; nothing when stopped)."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(callback)

    async def wait_first_attempt(self, grace: float) -> None:
        """Wait until the first connection attempt after `start()` succeeded or failed, but no
        longer than `grace` seconds after `start()` (on the connection's loop)."""
        first = self._first_attempt
        if first is None or first.is_set():
            return
        remaining = self._started_at + grace - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first.wait(), max(0.0, remaining))

    def note_error(self, message: str, *, quiet: bool = False) -> None:
        """Count an error, keep it for the health check, and log it when it is a new one (at
        DEBUG when `quiet`: a repeat the caller said already)."""
        self._last_error = message
        self._errors += 1
        metrics.NATS_ERRORS.inc()
        # While a server is down every attempt fails the same way: log the change, not the repeat.
        if message != self._last_logged_error and not quiet:
            self._last_logged_error = message
            logger.warning("nats: %s", message)
        else:
            logger.debug("nats: %s", message)

    # --- lifecycle ------------------------------------------------------------------------
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the connection thread once per process (idempotent, cheap when running)."""
        if self.started():
            return
        with self._lock:
            if self.started():  # another thread started it while this one waited for the lock
                return
            self._servers = list(settings.NATS_SERVERS)
            self._prefix = settings.KURS_NATS_PREFIX
            self._state = "connecting"
            self._jetstream = None
            self._last_error = None
            self._last_logged_error = None
            self._errors = 0
            self.connected.clear()
            metrics.NATS_DISCONNECTED.set(1)
            self.stream_checked.clear()
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run_loop, args=(loop, ready), name="kurs-nats", daemon=True
            )
            thread.start()
            ready.wait()
            self._loop = loop
            self._thread = thread
            atexit.register(self.shutdown)

    def _run_loop(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        self._sub_lock = asyncio.Lock()
        self._first_attempt = asyncio.Event()
        self._started_at = loop.time()
        for part in self._parts:
            part.loop_started(loop)
        self._connect_task = loop.create_task(self._connect())
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush the outbox, drain the connection and stop the thread (atexit, lifespan, tests);
        then the parts forget this process's past (`Part.stopped`), started or not."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is not None and thread is not None:
                self._stop(loop, thread, timeout)
            for part in self._parts:
                part.stopped()
        atexit.unregister(self.shutdown)

    def _stop(
        self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, timeout: float
    ) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._close(), loop)
            future.result(timeout)
        except Exception:
            logger.warning("nats: shutdown did not finish within %.1fs", timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = None
        self._thread = None
        self._client = None
        self._live_subs.clear()
        self.connected.clear()
        metrics.NATS_DISCONNECTED.set(0)  # stopped on purpose: not cut off
        self._state = "closed"

    def forget_after_fork(self) -> None:
        # A forked child (django-q2 workers) inherits this object but not the thread: start anew.
        self._lock = threading.Lock()
        self._thread = None
        self._loop = None
        self._client = None
        self._live_subs.clear()
        self._subscriptions.clear()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.stream_checked = threading.Event()
        self._state = "not_started"
        metrics.NATS_DISCONNECTED.set(0)
        for part in self._parts:
            part.forget_after_fork()

    async def _close(self) -> None:
        for part in self._parts:
            await part.closing()
        self._state = "closing"
        if self._connect_task is not None:
            self._connect_task.cancel()
        client = self._client
        if client is not None and client.is_connected:
            try:
                await client.drain()
            except Exception as exc:
                logger.warning("nats: drain failed: %s", exc)
        elif client is not None and not client.is_closed:
            await client.close()
        for part in self._parts:
            await part.closed()

    # --- connection and its callbacks -----------------------------------------------------
    async def _connect(self) -> None:
        client = Client()
        self._client = client
        assert self._first_attempt is not None
        try:
            await client.connect(
                servers=self._servers,
                name=f"kurs:{settings.KURS_INSTANCE}",
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # forever
                reconnect_time_wait=int(RECONNECT_MAX_S),  # between first-connect attempts (s)
                reconnect_to_server_handler=self._pick_server,
                connect_timeout=CONNECT_TIMEOUT_S,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
        except asyncio.CancelledError:
            self._first_attempt.set()  # shutting down: nothing to wait for any more
            raise
        except Exception as exc:
            self._state = "closed"
            self.note_error(f"cannot connect: {exc}")
            self._first_attempt.set()
            return
        self._state = "connected"
        url = client.connected_url
        logger.info(
            "nats: connected to %s as %s", url.netloc if url else "?", client.options["name"]
        )
        await self._apply_subscriptions()
        await self._became_connected()

    async def _became_connected(self) -> None:
        # The stream and the parts (the bridge's consumer) before `connected`: whoever waits for
        # it (a test, a command) may publish at once and expect the consumer to see it.
        await self._ensure_stream()
        for part in self._parts:
            await part.connected()
        self.disconnected.clear()
        self.connected.set()
        metrics.NATS_DISCONNECTED.set(0)
        if self._first_attempt is not None:
            self._first_attempt.set()
        for part in self._parts:
            part.ready()

    def _pick_server(self, servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        server = min(servers, key=lambda s: s.reconnects)
        return server, _reconnect_delay(server.reconnects)

    async def _on_error(self, exc: Exception) -> None:
        self.note_error(str(exc) or type(exc).__name__)
        if self._state == "connecting" and self._first_attempt is not None:
            # A first attempt failed (refused, timed out): NATS is not there now, so events
            # need not wait for it; they take the fallback until it connects.
            self._first_attempt.set()

    async def _on_disconnected(self) -> None:
        self.connected.clear()
        self.disconnected.set()
        if self._state != "closing":
            metrics.NATS_DISCONNECTED.set(1)
            self._state = "reconnecting"
            logger.warning("nats: disconnected; events go to the fallback bus until reconnected")

    async def _on_reconnected(self) -> None:
        self._state = "connected"
        # Health shows the error that is keeping NATS away, not one that is over.
        self._last_error = None
        self._last_logged_error = None
        client = self._client
        url = client.connected_url if client else None
        logger.info("nats: reconnected to %s", url.netloc if url else "?")
        # The parts re-make what a restarted server lost (the consumer, from its last sequence).
        await self._became_connected()

    async def _on_closed(self) -> None:
        self._state = "closed"
        self.connected.clear()
        logger.info("nats: connection closed")

    async def reconcile_stream(self) -> bool:
        """JetStream refused an event: the stream may be gone (deleted by an operator, a server
        restarted with an empty store) or changed. Reconciled as on a connection, at most once
        per STREAM_RECHECK_S; True when it was made again or updated (the refused events can
        be relayed now). A check JetStream does not answer (no leader yet) changes nothing:
        the relay's retries carry on (on the connection's loop)."""
        client = self._client
        now = asyncio.get_running_loop().time()
        if client is None or not client.is_connected or not self._jetstream:
            return False
        if now - self._reconciled_at < STREAM_RECHECK_S:
            return False
        self._reconciled_at = now
        return await self._ensure_stream(refused=True)

    async def _ensure_stream(self, *, refused: bool = False) -> bool:
        """Ensure the replay stream where the server has JetStream; a plain server is fine too.
        True when it was made or updated. After a refusal (`refused`), a check that fails only
        notes the error: the connection's own checks decide what JetStream there is."""
        client = self._client
        if client is None or not client.is_connected:
            return False
        name = stream_name(self._prefix)
        config = stream_config(self._prefix)
        js = client.jetstream(timeout=JETSTREAM_TIMEOUT_S)
        made = False
        try:
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                await js.add_stream(config)
                made = True
                log = logger.warning if refused else logger.info
                log("nats: JetStream stream %s created on %s.>", name, self._prefix)
            else:
                changed = stream_differences(info.config, config)
                if changed:
                    await js.update_stream(config)
                    made = True
                    logger.info("nats: JetStream stream %s updated (%s)", name, ", ".join(changed))
            self._jetstream = True
        except Exception as exc:
            if refused:
                # No answer (a stream electing its leader) is what the refusal was: not news.
                electing = isinstance(
                    exc, NatsTimeoutError | TimeoutError | ServiceUnavailableError
                )
                self.note_error(
                    f"JetStream stream {name} not reconciled after a refusal: {exc}", quiet=electing
                )
            else:
                self._stream_failed(name, exc)
        self.stream_checked.set()
        return made

    def _stream_failed(self, name: str, exc: Exception) -> None:
        """What a failed check on a connection says about JetStream here."""
        if isinstance(exc, NoRespondersError | ServiceUnavailableError):
            # A bare 503 (no responders) or "not enabled": no JetStream. Another 503 of its API
            # (no leader yet, say) is JetStream there but not ready.
            err_code = exc.err_code if isinstance(exc, ServiceUnavailableError) else None
            if err_code is not None and err_code not in JS_NOT_ENABLED:
                self._stream_unreachable(name, exc)
            else:
                self._jetstream = False  # a server without JetStream (for this account)
                logger.info("nats: server has no JetStream; stream %s not ensured", name)
        elif isinstance(exc, NatsTimeoutError | TimeoutError) or (
            isinstance(exc, APIError) and exc.err_code == JS_NO_PEERS_YET
        ):
            self._stream_unreachable(name, exc)
        else:
            self._jetstream = False
            self.note_error(f"JetStream stream {name}: {exc}")

    def _stream_unreachable(self, name: str, exc: Exception) -> None:
        """JetStream is there but not answering now (a cluster electing its leaders): a stream
        known to exist is still taken to exist (its events still get their acks, or are
        relayed), and the check is tried again shortly. Not yet known stays unknown (None),
        not "no JetStream": events sent meanwhile are not taken as delivered, and go to the
        stream with the relay once the check succeeds."""
        self.note_error(f"JetStream stream {name} not reachable now: {str(exc) or 'timeout'}")
        self._recheck_stream_later()

    def _recheck_stream_later(self) -> None:
        loop = self._loop
        if loop is None or (self._recheck is not None and not self._recheck.cancelled()):
            return

        def recheck() -> None:
            self._recheck = None
            if self.is_connected():
                # Kept, or the loop could drop the task before it ran.
                self._recheck_task = loop.create_task(self._became_connected())

        self._recheck = loop.call_later(STREAM_RECHECK_S, recheck)

    # --- plain subscriptions --------------------------------------------------------------
    def subscribe(self, subject: str, callback: MessageCallback) -> tuple[int, Future[None]]:
        """Subscribe (plain, no queue group) now or as soon as connected; kept across reconnects.

        The callback runs on the connection's own loop, in the "kurs-nats" thread. The future is
        done once the server has the subscription, or at once when not connected yet.
        """
        self.start()
        with self._lock:
            self._next_sub_id += 1
            sub_id = self._next_sub_id
            self._subscriptions[sub_id] = (subject, callback)
        return sub_id, self.submit(self._apply_subscriptions())

    def unsubscribe(self, sub_id: int) -> None:
        with self._lock:
            self._subscriptions.pop(sub_id, None)
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._drop_subscription(sub_id), self._loop)

    async def _apply_subscriptions(self) -> None:
        client = self._client
        if client is None or not client.is_connected or self._sub_lock is None:
            return  # applied on connect; nats-py itself restores them after a reconnect
        async with self._sub_lock:
            for sub_id, (subject, callback) in list(self._subscriptions.items()):
                if sub_id not in self._live_subs:
                    self._live_subs[sub_id] = await client.subscribe(subject, cb=callback)
            await client.flush(timeout=CONNECT_TIMEOUT_S)

    async def _drop_subscription(self, sub_id: int) -> None:
        sub = self._live_subs.pop(sub_id, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                logger.debug("nats: unsubscribe failed: %s", exc)

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        client = self._client
        connected = client is not None and client.is_connected
        url = client.connected_url if connected and client is not None else None
        status: dict[str, Any] = {
            "status": "ok" if connected else "degraded",
            "state": self._state,
            "server": url.netloc if url is not None else None,
            "jetstream": self._jetstream,
            "last_error": self._last_error,
        }
        for part in self._parts:
            status.update(part.status())
        return status


connection = NatsConnection()
os.register_at_fork(after_in_child=connection.forget_after_fork)
