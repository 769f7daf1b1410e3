"""The edge reads its settings once (as Django's middleware does): here it reads them again
whenever a test changes one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.test.signals import setting_changed

from config.asgi import http_app


@pytest.fixture(autouse=True)
def edge_follows_settings() -> Iterator[None]:
    def reload(**_: Any) -> None:
        http_app.reload()

    setting_changed.connect(reload, weak=False)
    try:
        yield
    finally:
        setting_changed.disconnect(reload)
        http_app.reload()
