"""django-q2 tasks: one-line wrappers around the rates services.

The schedules that run them are created by migration `rates.0002_schedules`.
"""

from __future__ import annotations

from typing import Any

from rates import fetch_control, services


def fetch_rates() -> dict[str, Any]:
    """One REST fetch cycle over every provider: the safety net when no `--watch` runs."""
    return fetch_control.fetch_rates()


def prune_history() -> int:
    """Delete Rate rows older than KURS_HISTORY_DAYS."""
    return services.prune_history()
