"""A local exchange emulator: every built-in provider's real paths and payloads on one port.

See README.md in this package for the paths, the fault switches and the control API.
"""

from __future__ import annotations

from rates.emulator.app import EmulatorApp
from rates.emulator.market import (
    MODES,
    PROVIDERS,
    Fault,
    Market,
    parse_depeg,
    parse_fault_flag,
)
from rates.emulator.server import EmulatorServer, run_emulator_server

__all__ = [
    "MODES",
    "PROVIDERS",
    "EmulatorApp",
    "EmulatorServer",
    "Fault",
    "Market",
    "parse_depeg",
    "parse_fault_flag",
    "run_emulator_server",
]
