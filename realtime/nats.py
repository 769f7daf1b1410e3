"""The process's one NATS connection, and the transport that `realtime.events.publish` uses.

Every process (web, fetcher, qcluster worker, a management command) owns at most one nats-py
connection. It lives on its own event loop in a daemon thread ("kurs-nats"), so that code in any
thread, sync or async, can publish without an event loop of its own and without waiting for the
network: `publish_envelope()` only appends to an in-memory outbox and wakes that loop.

When the connection is down, the outbox goes to the fallback bus instead: a channel-layer group
that every web process's bridge listens on (channels-redis), or, with the in-memory layer (one
process, no Redis), straight to this process's bridge. Events published during an outage are not
replayed on NATS later: the database keeps the truth, NATS is a live feed (at most once).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import random
import re
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

from channels.layers import InMemoryChannelLayer, channel_layers
from django.conf import settings
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

from config.jsonenc import dumps
from realtime import metrics

logger = logging.getLogger(__name__)

ORIGIN_HEADER = "Kurs-Origin"
STREAM_MAX_AGE_S = 24 * 3600
# The seeds' subject, outside the prefix (SPEC 7).
SEED_SUBJECT = "items.updates"
# The channel-layer message type the bridge listens for on the fallback group.
FALLBACK_MESSAGE_TYPE = "kurs.event"

# Reconnect back-off: doubling from RECONNECT_BASE_S up to RECONNECT_MAX_S, with jitter so that
# many processes do not hammer a restarted server in step.
RECONNECT_BASE_S = 0.1
RECONNECT_MAX_S = 2.0
CONNECT_TIMEOUT_S = 2
# Bounded memory when both NATS and the fallback stall: the oldest events are dropped first.
OUTBOX_LIMIT = 10_000
SHUTDOWN_TIMEOUT_S = 5.0
# While the first connection is being made, events wait this long for it before they take the
# fallback bus: a one-shot command or a fresh worker publishes right after start-up, and its
# in-memory fallback would reach no one.
FIRST_CONNECT_GRACE_S = 2.0

MessageCallback = Callable[[Msg], Awaitable[None]]


def fallback_group() -> str:
    """The channel-layer group every web process's bridge joins (one per prefix)."""
    return f"{settings.KURS_NATS_PREFIX}.events"


def stream_name(prefix: str) -> str:
    """`kurs` -> `KURS` (SPEC 7); another prefix gets its own stream, so tests never touch it."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix).upper()


def event_subjects(prefix: str) -> list[str]:
    """What the replay stream keeps: every event family of SPEC 7 under the prefix.

    Not `<prefix>.>` as a whole: a request on `<prefix>.ctl.fetch` captured by a stream would be
    answered by JetStream's publish acknowledgement before the owner could reply, and control
    requests are not events anyone should replay.
    """
    return [f"{prefix}.{family}.>" for family in ("items", "rates", "fetch", "provider")]


def control_prefix(prefix: str) -> str:
    """Request/reply subjects (`kurs.ctl.fetch`): never events, never relayed to clients."""
    return f"{prefix}.ctl."


def _reconnect_delay(attempts: int) -> float:
    ceiling = min(RECONNECT_MAX_S, RECONNECT_BASE_S * (2 ** min(attempts, 16)))
    return ceiling * random.uniform(0.5, 1.0)


class NatsConnection:
    """One managed connection: reconnects forever, logs its callbacks, drains on shutdown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._outbox: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._wakeup_pending = False
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: dict[int, tuple[str, MessageCallback]] = {}
        self._live_subs: dict[int, Any] = {}
        self._next_sub_id = 0
        self._local_fallback: Callable[[str, bytes], None] | None = None
        self._layer: Any = None
        self._servers: list[str] = []
        self._prefix = ""
        self._state = "not_started"
        self._jetstream: bool | None = None
        self._last_error: str | None = None
        self._last_logged_error: str | None = None
        self._counts = {"nats": 0, "fallback": 0, "dropped": 0, "errors": 0}
        self._sub_lock: asyncio.Lock | None = None
        # Set while connected with every registered subscription applied.
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        # Set once the JetStream stream was ensured, or found unsupported, on this connection.
        self.stream_checked = threading.Event()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the connection thread once per process (idempotent, cheap when running)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._servers = list(settings.NATS_SERVERS)
            self._prefix = settings.KURS_NATS_PREFIX
            self._state = "connecting"
            self._jetstream = None
            self._last_error = None
            self._last_logged_error = None
            self._counts = dict.fromkeys(self._counts, 0)
            self.connected.clear()
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
        self._wake = asyncio.Event()
        self._sub_lock = asyncio.Lock()
        self._first_attempt = asyncio.Event()
        self._first_attempt_deadline = loop.time() + FIRST_CONNECT_GRACE_S
        self._tasks = [loop.create_task(self._connect()), loop.create_task(self._pump())]
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush the outbox, drain the connection and stop the thread (atexit, lifespan, tests)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
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
            self._state = "closed"
        atexit.unregister(self.shutdown)

    def _forget_after_fork(self) -> None:
        # A forked child (django-q2 workers) inherits this object but not the thread: start anew.
        self._lock = threading.Lock()
        self._thread = None
        self._loop = None
        self._client = None
        self._live_subs.clear()
        self._subscriptions.clear()
        self._outbox.clear()
        self._wakeup_pending = False
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.stream_checked = threading.Event()
        self._state = "not_started"

    async def _close(self) -> None:
        await self._flush_outbox()
        self._state = "closing"
        for task in self._tasks:
            task.cancel()
        client = self._client
        if client is not None and client.is_connected:
            try:
                await client.drain()
            except Exception as exc:
                logger.warning("nats: drain failed: %s", exc)
        elif client is not None and not client.is_closed:
            await client.close()
        if self._layer is not None and hasattr(self._layer, "close_pools"):
            await self._layer.close_pools()
        self._layer = None
        logger.info(
            "nats: closed (published %d, fallback %d, dropped %d, errors %d)",
            self._counts["nats"],
            self._counts["fallback"],
            self._counts["dropped"],
            self._counts["errors"],
        )

    # --- connection and its callbacks -----------------------------------------------------
    async def _connect(self) -> None:
        client = Client()
        self._client = client
        try:
            await client.connect(
                servers=self._servers,
                name=f"kurs:{settings.KURS_INSTANCE}",
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # forever
                reconnect_time_wait=RECONNECT_MAX_S,  # between first-connect attempts
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
            self._note_error(f"cannot connect: {exc}")
            self._first_attempt.set()
            return
        self._state = "connected"
        url = client.connected_url
        logger.info(
            "nats: connected to %s as %s", url.netloc if url else "?", client.options["name"]
        )
        await self._apply_subscriptions()
        self.disconnected.clear()
        self.connected.set()
        self._first_attempt.set()
        await self._ensure_stream()
        self._kick_pump()

    def _pick_server(self, servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        server = min(servers, key=lambda s: s.reconnects)
        return server, _reconnect_delay(server.reconnects)

    async def _on_error(self, exc: Exception) -> None:
        self._note_error(str(exc) or type(exc).__name__)
        if self._state == "connecting":
            # A first attempt failed (refused, timed out): NATS is not there now, so events
            # need not wait for it; they take the fallback until it connects.
            self._first_attempt.set()

    async def _on_disconnected(self) -> None:
        self.connected.clear()
        self.disconnected.set()
        if self._state != "closing":
            self._state = "reconnecting"
            logger.warning("nats: disconnected; events go to the fallback bus until reconnected")

    async def _on_reconnected(self) -> None:
        self._state = "connected"
        self._last_logged_error = None
        self.disconnected.clear()
        self.connected.set()
        client = self._client
        url = client.connected_url if client else None
        logger.info("nats: reconnected to %s", url.netloc if url else "?")
        await self._ensure_stream()
        self._kick_pump()

    async def _on_closed(self) -> None:
        self._state = "closed"
        self.connected.clear()
        logger.info("nats: connection closed")

    def _note_error(self, message: str) -> None:
        self._last_error = message
        self._counts["errors"] += 1
        metrics.NATS_ERRORS.inc()
        # While a server is down every attempt fails the same way: log the change, not the repeat.
        if message != self._last_logged_error:
            self._last_logged_error = message
            logger.warning("nats: %s", message)
        else:
            logger.debug("nats: %s", message)

    async def _ensure_stream(self) -> None:
        """Ensure the replay stream where the server has JetStream; a plain server is fine too."""
        client = self._client
        if client is None or not client.is_connected:
            return
        name = stream_name(self._prefix)
        config = StreamConfig(
            name=name, subjects=event_subjects(self._prefix), max_age=STREAM_MAX_AGE_S
        )
        js = client.jetstream(timeout=2.0)
        try:
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                await js.add_stream(config)
                logger.info("nats: JetStream stream %s created on %s.>", name, self._prefix)
            else:
                if info.config.subjects != config.subjects or info.config.max_age != config.max_age:
                    await js.update_stream(config)
                    logger.info("nats: JetStream stream %s updated", name)
            self._jetstream = True
        except (NoRespondersError, ServiceUnavailableError, NatsTimeoutError, TimeoutError):
            self._jetstream = False
            logger.info("nats: server has no JetStream; stream %s not ensured", name)
        except Exception as exc:
            self._jetstream = False
            self._note_error(f"JetStream stream {name}: {exc}")
        self.stream_checked.set()

    # --- subscriptions ----------------------------------------------------------------------
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
        assert self._loop is not None
        return sub_id, asyncio.run_coroutine_threadsafe(self._apply_subscriptions(), self._loop)

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

    def set_local_fallback(self, deliver: Callable[[str, bytes], None] | None) -> None:
        """Where fallback events go with the in-memory channel layer (this process's bridge)."""
        self._local_fallback = deliver

    # --- publishing -------------------------------------------------------------------------
    def publish(self, subject: str, payload: bytes, event_id: str | None = None) -> None:
        """Queue one message; never blocks on the network, callable from any thread."""
        self.start()
        headers = {ORIGIN_HEADER: settings.KURS_INSTANCE}
        if event_id:
            # JetStream drops a duplicate of the same id inside its window.
            headers["Nats-Msg-Id"] = event_id
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self._counts["dropped"] += 1
            logger.warning("nats: outbox full (%d), dropped the oldest event", OUTBOX_LIMIT)
        self._outbox.append((subject, payload, headers))
        # The flag is cleared by the pump before it drains, and set here after the append: a
        # wake-up is never lost, and a burst of publishes costs one self-pipe write.
        if not self._wakeup_pending:
            self._wakeup_pending = True
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._kick_pump)

    def _kick_pump(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _pump(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        self._wakeup_pending = False
        if not self._first_attempt.is_set():
            remaining = self._first_attempt_deadline - asyncio.get_running_loop().time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_attempt.wait(), max(0.0, remaining))
        outbox = self._outbox
        while outbox:
            subject, payload, headers = outbox.popleft()
            client = self._client
            if client is not None and client.is_connected:
                try:
                    await client.publish(subject, payload, headers=headers)
                    self._counts["nats"] += 1
                    metrics.NATS_PUBLISHES.labels(path="nats").inc()
                    continue
                except Exception as exc:
                    self._note_error(f"publish on {subject} failed: {exc}")
            await self._publish_fallback(subject, payload)

    async def _publish_fallback(self, subject: str, payload: bytes) -> None:
        # Counted before the hand-over: the event may reach a socket before this line resumes.
        self._counts["fallback"] += 1
        metrics.NATS_PUBLISHES.labels(path="fallback").inc()
        try:
            layer = self._fallback_layer()
            if isinstance(layer, InMemoryChannelLayer) or layer is None:
                if self._local_fallback is not None:
                    self._local_fallback(subject, payload)
            else:
                await layer.group_send(
                    fallback_group(),
                    {"type": FALLBACK_MESSAGE_TYPE, "subject": subject, "payload": payload},
                )
        except Exception as exc:
            self._counts["dropped"] += 1
            self._note_error(f"fallback for {subject} failed, event dropped: {exc}")

    def _fallback_layer(self) -> Any:
        # A layer instance of its own: channels-redis pools belong to the loop that made them.
        if self._layer is None and "default" in channel_layers.configs:
            self._layer = channel_layers.make_backend("default")
        return self._layer

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        client = self._client
        connected = client is not None and client.is_connected
        url = client.connected_url if connected and client is not None else None
        return {
            "status": "ok" if connected else "degraded",
            "state": self._state,
            "server": url.netloc if url is not None else None,
            "jetstream": self._jetstream,
            "last_error": self._last_error,
            "published": self._counts["nats"],
            "fallback": self._counts["fallback"],
            "dropped": self._counts["dropped"],
            "outbox": len(self._outbox),
        }

    def is_connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected


connection = NatsConnection()
os.register_at_fork(after_in_child=connection._forget_after_fork)


def transport(subject: str, envelope: dict[str, Any]) -> None:
    """The `realtime.events` transport: serialise in the caller's thread, queue, return."""

    connection.publish(subject, dumps(envelope).encode(), envelope.get("id"))


class Responder:
    """A request/reply service on one subject, kept across reconnects until `close()`."""

    def __init__(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> None:
        self.subject = subject
        self._handler = handler
        self._sub_id, _ = connection.subscribe(subject, self._on_request)

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            answer = await self._handler(msg.data)
        except Exception:
            logger.exception("nats: the handler of %s failed", self.subject)
            return
        await msg.respond(answer)

    def close(self) -> None:
        connection.unsubscribe(self._sub_id)


def serve(subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> Responder:
    """Answer requests on `subject` with `handler(payload)` (it runs on the NATS thread)."""
    return Responder(subject, handler)


async def request(subject: str, payload: bytes, *, within: float) -> bytes | None:
    """A NATS request from any event loop; the reply, or None when nobody answered in time."""
    connection.start()
    loop = connection._loop
    client = connection._client
    if loop is None or client is None or not client.is_connected:
        return None

    async def ask() -> bytes:
        return (await client.request(subject, payload, timeout=within)).data

    try:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ask(), loop))
    except (NoRespondersError, NatsTimeoutError, TimeoutError):
        return None
    except Exception as exc:
        logger.warning("nats: request on %s failed: %s", subject, exc)
        return None


def status() -> dict[str, Any]:
    """For the health check: `{"status": "ok"|"degraded", "state", "server", "jetstream", ...}`.

    `degraded` whenever this process is not connected to NATS (not started, connecting,
    reconnecting, closed): events then travel over the channel-layer fallback.
    """
    return connection.status()


def wait_connected(timeout: float) -> bool:
    """Block until connected or `timeout` passes (tests, start-up of long-running commands)."""
    connection.start()
    return connection.connected.wait(timeout)


def shutdown() -> None:
    connection.shutdown()
