"""Prometheus metrics of the realtime path, on the default registry that `/metrics` exposes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NATS_PUBLISHES = Counter(
    "kurs_nats_publishes_total", "Events published, by path (nats or fallback).", ["path"]
)
NATS_ERRORS = Counter("kurs_nats_errors_total", "NATS connection and publish errors.")
# 1 while this process has started its NATS connection and is not connected (connecting,
# reconnecting): a process that never uses NATS stays 0, so the sum counts the cut-off ones.
NATS_DISCONNECTED = Gauge(
    "kurs_nats_disconnected",
    "1 while this process wants NATS and is not connected to it (events take the fallback bus).",
    multiprocess_mode="livesum",
)
NATS_INBOUND = Counter(
    "kurs_nats_inbound_total",
    "Messages from outside Kurs, by outcome (relayed or dropped).",
    ["outcome"],
)
# Summed over the live processes (PROMETHEUS_MULTIPROC_DIR), not one series per pid ever seen.
WS_CONNECTIONS = Gauge(
    "kurs_ws_connections", "Open /ws/items sockets.", multiprocess_mode="livesum"
)
SSE_CONNECTIONS = Gauge(
    "kurs_sse_connections", "Open /api/v1/stream responses.", multiprocess_mode="livesum"
)
WS_COALESCED = Counter(
    "kurs_ws_coalesced_total", "Rate updates replaced by a newer one before they were sent."
)
WS_SLOW_DISCONNECTS = Counter(
    "kurs_ws_slow_disconnects_total", "Sockets closed with 1013 for falling behind."
)
# From JetStream storing an event (the server's clock) to this process's bridge handling it on
# its loop (the local clock): how far the sockets of this web process are behind the stream.
BRIDGE_EVENT_LAG = Histogram(
    "kurs_bridge_event_lag_seconds",
    "Seconds from JetStream storing an event to this web process's bridge handling it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
