"""Fixtures of the rates tests: the emulator (from the providers' reusable module) and ours."""

from __future__ import annotations

from rates.tests.conftest_emulator import emulator, emulator_client  # noqa: F401
from rates.tests.support import (  # noqa: F401
    fresh_board,
    on_demand_clock,
    rate_settings,
    tracked,
)
