"""`python manage.py qcluster`: django-q2's cluster (docs/rates.md#fetching), with the metrics port
when set.

The `rates` app is listed before `django_q` in INSTALLED_APPS, so this command is the one run.
The port is served by the cluster's main process, before it forks the sentinel and workers; it
sums the workers' metrics through PROMETHEUS_MULTIPROC_DIR (`config.metrics_port`).
"""

from __future__ import annotations

from typing import Any

from django_q.management.commands.qcluster import Command as ClusterCommand

from config.metrics_port import serve_metrics_port


class Command(ClusterCommand):  # type: ignore[misc]  # django-q2 ships no type information
    def handle(self, *args: Any, **options: Any) -> None:
        serve_metrics_port("qcluster")
        super().handle(*args, **options)
