"""Repo-wide fixtures. Test settings live in `config/test_settings.py`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def published_events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every (subject, envelope) that `realtime.events.publish` hands to its transports."""
    from realtime import events

    seen: list[tuple[str, dict[str, Any]]] = []

    def probe(subject: str, envelope: dict[str, Any]) -> None:
        seen.append((subject, envelope))

    events.add_transport(probe)
    try:
        yield seen
    finally:
        events.remove_transport(probe)
