"""NATS for Kurs: one connection per process, its outbox, the stream, request/reply.

- `link`: the connection (its thread and loop, reconnection, plain subscriptions, the stream
  ensured) and the small surface the rest uses.
- `publishing`: the send queue `realtime.events.publish` fills (`transport`), JetStream's acks
  (`on_acked`), the relay of the database outbox (`relay_undelivered`) and the fallback bus.
- `stream`: the bridge's ordered consumer and the resuming client's `StreamCursor`.
- `rpc`: `serve` and `request` (the live owner's control subject).
- `subjects`: the names (subjects, stream, header, fallback group).

docs/events.md describes the subjects and the delivery guarantees for users. The names below are
what other modules use; importing this package registers the outbox and the consumer on the
connection.
"""

from __future__ import annotations

from typing import Any

from realtime.nats.link import NatsConnection, StreamUnavailable, connection
from realtime.nats.publishing import (
    AckCallback,
    on_acked,
    outbox,
    relay_only,
    relay_undelivered,
    transport,
)
from realtime.nats.rpc import Responder, request, serve
from realtime.nats.stream import REPLAY_WAIT_S, StoredMessage, StreamCursor, stream_consumer
from realtime.nats.subjects import (
    FALLBACK_MESSAGE_TYPE,
    ORIGIN_HEADER,
    SEED_SUBJECT,
    control_prefix,
    event_subjects,
    fallback_group,
    stream_name,
)

__all__ = [
    "FALLBACK_MESSAGE_TYPE",
    "ORIGIN_HEADER",
    "REPLAY_WAIT_S",
    "SEED_SUBJECT",
    "AckCallback",
    "NatsConnection",
    "Responder",
    "StoredMessage",
    "StreamCursor",
    "StreamUnavailable",
    "connection",
    "control_prefix",
    "event_subjects",
    "fallback_group",
    "on_acked",
    "outbox",
    "relay_only",
    "relay_undelivered",
    "request",
    "serve",
    "shutdown",
    "status",
    "stream_consumer",
    "stream_name",
    "transport",
    "wait_connected",
]


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
