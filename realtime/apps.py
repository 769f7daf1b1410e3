from __future__ import annotations

from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime"

    def ready(self) -> None:
        from edge.metrics import mark_dead_at_exit
        from realtime import events, nats

        # Every process publishes through its one NATS connection, started on first publish.
        events.add_transport(nats.transport)
        # Every Kurs process (web, fetcher, qcluster) loads this app: its gauges leave with it.
        mark_dead_at_exit()
