"""The emulator's synthetic listing: N made-up coins on every crypto provider."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from websockets.asyncio.client import connect

from rates.emulator import Market, run_emulator_server
from rates.emulator.market import synthetic_listing

WAIT = 5.0


def test_the_listing_is_the_same_every_run_and_plausible() -> None:
    listing = synthetic_listing(300)
    assert listing == synthetic_listing(300)
    assert list(listing)[:2] == ["SYN0001", "SYN0002"]
    assert list(listing)[-1] == "SYN0300"
    for price, decimals in listing.values():
        value = Decimal(price)
        assert Decimal("0.01") <= value <= Decimal(10_000)
        assert value.as_tuple().exponent == -decimals
        assert len(value.normalize().as_tuple().digits) <= 6  # about six significant digits
    market = Market(synthetic_pairs=3)
    assert {"SYN0003USDT", "BTCUSDT"} <= set(market.books["bybit"].prices)
    assert "syn0003.usd" in market.books["coingecko"].prices
    assert "SYN0001" not in market.books["cbr"].prices  # the CBR lists fiat only
    with pytest.raises(ValueError, match="synthetic pairs"):
        Market(synthetic_pairs=10_000)


async def test_synthetic_pairs_are_served_in_every_format_and_each_ticks() -> None:
    async with (
        run_emulator_server(tick=0.2, seed=3, synthetic_pairs=40) as emulator,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        binance = (await client.get(f"{emulator.rest_url('binance')}/api/v3/ticker/price")).json()
        assert {f"SYN{n:04d}USDT" for n in range(1, 41)} <= {row["symbol"] for row in binance}
        bybit = await client.get(
            f"{emulator.rest_url('bybit')}/v5/market/tickers",
            params={"category": "spot", "symbol": "SYN0040USDT"},
        )
        assert bybit.json()["result"]["list"][0]["symbol"] == "SYN0040USDT"
        gecko = await client.get(
            f"{emulator.rest_url('coingecko')}/api/v3/simple/price",
            params={"ids": "syn0007,bitcoin", "vs_currencies": "usd"},
        )
        assert set(gecko.json()) == {"syn0007", "bitcoin"}

        streams = "/".join(f"syn{n:04d}usdt@ticker" for n in range(1, 41))
        url = f"{emulator.ws_url('binance')}/stream?streams={streams}"
        async with connect(url) as ws:
            # The current ticker of each at once, then every symbol again on the next tick.
            seen: dict[str, int] = {}
            while len(seen) < 40 or min(seen.values()) < 2:
                frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
                seen[frame["data"]["s"]] = seen.get(frame["data"]["s"], 0) + 1
        state = (await client.get(f"{emulator.base_url}/_control")).json()
        assert state["providers"]["binance"]["frames_sent"] >= 80


def test_the_command_refuses_a_listing_out_of_range() -> None:
    with pytest.raises(CommandError, match="--synthetic-pairs"):
        call_command("run_emulator", "--synthetic-pairs", "-1")


def test_a_tick_spread_over_slices_moves_each_symbol_once_slice_by_slice() -> None:
    market = Market(synthetic_pairs=6, seed=1, slices=3)
    book = market.books["binance"]
    changes = book.subscribe()
    symbols = list(book.prices)
    steps = market.steps()
    moved: list[list[str]] = []
    for part in range(market.slices):
        market.walk(steps, part, market.slices)
        batch = []
        while not changes.empty():
            change = changes.get_nowait()
            assert change is not None
            batch.append(change.symbol)
        moved.append(batch)
    # Each slice moved every third symbol, and the tick moved each symbol exactly once.
    assert moved == [symbols[0::3], symbols[1::3], symbols[2::3]]
