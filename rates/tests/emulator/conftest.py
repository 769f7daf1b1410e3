from __future__ import annotations

from pathlib import Path

import pytest

from rates.tests.conftest_emulator import emulator, emulator_client

__all__ = ["emulator", "emulator_client"]

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # uvicorn < 0.35 serves WebSockets through websockets.legacy, which warns about its own API.
    quiet = pytest.mark.filterwarnings("ignore::DeprecationWarning:websockets.legacy.*")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(quiet)
