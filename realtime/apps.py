from __future__ import annotations

from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime"

    def ready(self) -> None:
        from realtime import events, nats

        # Every process publishes through its one NATS connection, started on first publish.
        events.add_transport(nats.transport)
