"""A broken peg end to end over real processes (docs/rates.md#pegs): a fetcher and a uvicorn web
process on a SQLite file and the machine's NATS, against the emulator's `depeg` scenario.

What a user sees is checked: BTC-USD (BTCUSDT through the USD proxy) `depeg` at the true price
on REST, the WebSocket, the SSE stream and NATS; `peg.broken` on the socket and NATS;
`/api/v1/pegs` and health, read by the web process from the shared cache the owner writes; a
new owner that starts from the saved state (never `live` in between); then the way back.
How fast is a figure of bench/bench_pegs.py, not of this test: it waits generously.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import pytest_asyncio

from rates.emulator import EmulatorServer, run_emulator_server
from tests.services import NATS_URL, require
from tests.stack import Stack, wait_until, watching

pytestmark = [pytest.mark.nats, pytest.mark.timeout(240)]

PAIR = "BTC-USD"
SURFACES = ("rest", "ws", "sse", "nats")


@pytest_asyncio.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with run_emulator_server(host="127.0.0.1", port=0, tick=3600, seed=7) as server:
        yield server


@pytest_asyncio.fixture
async def stack(tmp_path: Path, emulator: EmulatorServer) -> AsyncIterator[Stack]:
    require("NATS", "127.0.0.1", 4222)
    built = Stack(
        folder=tmp_path,
        emulator=emulator,
        providers="binance,bybit,coingecko",
        extra_env={"KURS_PEGS": "USDT:USD:0.01"},
    )
    await asyncio.to_thread(built.migrate, active=(PAIR, "USDTTRC-USD"))
    try:
        yield built
    finally:
        await asyncio.to_thread(built.stop)


async def get(port: int | None, path: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{port}{path}")
        return json.loads(response.text, parse_float=Decimal)


async def test_a_depeg_is_seen_everywhere_survives_a_new_owner_and_ends(
    stack: Stack, emulator: EmulatorServer
) -> None:
    owner = stack.fetcher("fetcher-a")
    web = stack.web()
    heard: list[str] = []
    client = await nats.connect(NATS_URL)
    try:

        async def record(msg: Any) -> None:
            heard.append(json.loads(msg.data)["type"])

        await client.subscribe(f"{stack.prefix}.peg.>", cb=record)
        async with watching(stack, web, PAIR, SURFACES) as watch:
            await wait_until(
                lambda: set(watch.latest.values()) == {("binance", "live")},
                within=60,
                what="binance serving BTC-USD live",
            )
            true = emulator.market.books["coingecko"].prices["bitcoin.usd"]
            shown = await watch.until(
                "binance", "depeg", lambda: emulator.set_depeg("0.97"), within=20
            )
            assert set(shown) == set(SURFACES), shown
            await wait_until(lambda: "peg.broken" in heard, within=10, what="peg.broken on NATS")
            assert set(watch.heard["peg.broken"]) == {"ws", "sse"}
            latest = await get(web.port, f"/api/v1/items/{stack.item_id(PAIR)}/rates/latest")
            assert abs(latest["value"] / true - 1) < Decimal("0.002")
            assert latest["route"][-1]["provider"] == "peg"
            (peg,) = await get(web.port, "/api/v1/pegs")
            assert peg["state"] == "broken"
            assert (await get(web.port, "/api/v1/health"))["components"]["pegs"]["status"] == (
                "degraded"
            )

            # A new owner: it starts from the state the last one saved, never serving it live.
            # (Judged from here, when every surface has shown the depeg: before, a slower
            # surface may still show the first owner's live value after NATS showed the depeg.)
            handed_over = len(watch.shown)
            await asyncio.to_thread(owner.stop)
            stack.fetcher("fetcher-b")
            await wait_until(
                lambda: (stack.lease() or ("",))[0].startswith("fetcher-b"),
                within=30,
                what="fetcher-b owning",
            )
            item = stack.item_id(PAIR)
            sql = "SELECT version FROM rates_currentrate WHERE item_id = ?"
            version = int(stack.query(sql, item)[0][0])
            await wait_until(
                lambda: int(stack.query(sql, item)[0][0]) > version,
                within=30,
                what="a write by the new owner",
            )
            after = watch.shown[handed_over:]
            assert ("binance", "live") not in [(p, s) for _, p, s in after], after

            await watch.until("binance", "live", lambda: emulator.set_depeg("1"), within=40)
            await wait_until(lambda: "peg.restored" in heard, within=10, what="peg.restored")
            assert heard.count("peg.broken") == 1  # the new owner did not break it again
            assert (await get(web.port, "/api/v1/pegs"))[0]["state"] == "ok"
    finally:
        await client.close()
