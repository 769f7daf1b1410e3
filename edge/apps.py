from __future__ import annotations

from django.apps import AppConfig


class EdgeConfig(AppConfig):
    name = "edge"
    verbose_name = "HTTP edge"

    def ready(self) -> None:
        from edge import checks  # noqa: F401 - registers the deploy checks
