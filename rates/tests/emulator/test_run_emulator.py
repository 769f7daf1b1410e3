from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault", "binance=melt"], "--fault: mode"),
        (["--fault", "kraken=down"], "--fault"),
        (["--port", "70000"], "--port"),
        (["--tick", "0"], "--tick"),
        (["--depeg", "0"], "--depeg: price"),
        (["--fault", "bybit=skew:percent=80"], "--fault: percent"),
    ],
)
def test_it_refuses_bad_flags_before_serving(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("run_emulator", *args)
