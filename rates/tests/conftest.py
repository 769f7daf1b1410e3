"""Fixtures of the rates tests: the emulator (from the providers' reusable module) and ours."""

from __future__ import annotations

from rates.tests.conftest_emulator import emulator, emulator_client  # noqa: F401
from rates.tests.support import fresh_board, rate_settings  # noqa: F401
