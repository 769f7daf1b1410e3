"""Prometheus metrics of the realtime path, on the default registry that `/metrics` exposes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

NATS_PUBLISHES = Counter(
    "kurs_nats_publishes_total", "Events published, by path (nats or fallback).", ["path"]
)
NATS_ERRORS = Counter("kurs_nats_errors_total", "NATS connection and publish errors.")
NATS_INBOUND = Counter(
    "kurs_nats_inbound_total",
    "Messages from outside Kurs, by outcome (relayed or dropped).",
    ["outcome"],
)
WS_CONNECTIONS = Gauge("kurs_ws_connections", "Open /ws/items sockets in this process.")
SSE_CONNECTIONS = Gauge("kurs_sse_connections", "Open /api/v1/stream responses in this process.")
WS_COALESCED = Counter(
    "kurs_ws_coalesced_total", "Rate updates replaced by a newer one before they were sent."
)
WS_SLOW_DISCONNECTS = Counter(
    "kurs_ws_slow_disconnects_total", "Sockets closed with 1013 for falling behind."
)
