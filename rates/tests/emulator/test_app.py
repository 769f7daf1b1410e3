from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from rates.emulator import EmulatorServer, Fault, Market, parse_fault_flag, run_emulator_server

WAIT = 3.0


async def test_it_shows_every_switch(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    state = (await emulator_client.get(f"{emulator.base_url}/_control")).json()
    assert set(state["providers"]) == {"binance", "bybit", "coingecko", "cbr"}
    assert state["providers"]["binance"]["mode"] == "ok"
    assert "drop_stream" in state["modes"]


async def test_it_sets_and_resets_a_fault(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    url = f"{emulator.base_url}/_control"
    response = await emulator_client.post(f"{url}/all", json={"mode": "slow", "delay": 0.5})
    assert response.status_code == 200
    state = (await emulator_client.get(url)).json()
    assert {p["mode"] for p in state["providers"].values()} == {"slow"}
    await emulator_client.post(f"{url}/reset")
    state = (await emulator_client.get(url)).json()
    assert {p["mode"] for p in state["providers"].values()} == {"ok"}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"mode": "melt"}, "mode"),
        ({"mode": "slow", "delay": -1}, "delay"),
        ({"mode": "down", "status": 200}, "status"),
        ({"mode": "ok", "colour": "red"}, "unknown field"),
    ],
)
async def test_it_rejects_a_bad_switch(
    emulator: EmulatorServer,
    emulator_client: httpx.AsyncClient,
    body: dict[str, object],
    detail: str,
) -> None:
    response = await emulator_client.post(f"{emulator.base_url}/_control/binance", json=body)
    assert response.status_code == 422
    assert detail in response.json()["detail"]


async def test_it_sets_a_price_and_says_when(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    response = await emulator_client.post(
        f"{emulator.base_url}/_control/binance/price", json={"symbol": "ETHUSDT", "price": "3333.3"}
    )
    body = response.json()
    assert body["price"] == "3333.3"
    assert body["changed_at"].endswith("Z")
    assert emulator.market.books["binance"].prices["ETHUSDT"] == Decimal("3333.3")
    assert emulator.market.books["binance"].changed_ms["ETHUSDT"] == body["changed_at_ms"]
    bad = await emulator_client.post(
        f"{emulator.base_url}/_control/binance/price", json={"symbol": "NOPE", "price": "1"}
    )
    assert bad.status_code == 422


async def test_binance_rejects_a_symbols_array_with_spaces(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    url = f"{emulator.base_url}/binance/api/v3/ticker/price"
    spaced = await emulator_client.get(url, params={"symbols": '["BTCUSDT", "ETHUSDT"]'})
    assert spaced.status_code == 400
    assert spaced.json()["code"] == -1100
    compact = await emulator_client.get(url, params={"symbols": '["BTCUSDT","ETHUSDT"]'})
    assert [row["symbol"] for row in compact.json()] == ["BTCUSDT", "ETHUSDT"]
    single = await emulator_client.get(url, params={"symbol": "BTCUSDT"})
    assert single.json() == {"symbol": "BTCUSDT", "price": "90000.00000000"}


async def test_rate_limits_carry_retry_after_and_the_binance_body(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("binance", "rate_limited", retry_after=7)
    response = await emulator_client.get(f"{emulator.base_url}/binance/api/v3/ticker/price")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["code"] == -1003


async def test_cbr_serves_a_nominal_other_than_one(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    response = await emulator_client.get(f"{emulator.base_url}/cbr/daily_json.js")
    valute = json.loads(response.text, parse_float=Decimal)["Valute"]
    assert {"USD", "EUR", "AUD", "CAD"} <= set(valute)
    assert valute["JPY"]["Nominal"] == 100
    assert valute["JPY"]["Value"] == Decimal("52.8010")


async def test_prices_random_walk_on_every_tick() -> None:
    async with run_emulator_server(tick=0.01, seed=1) as emulator:
        book = emulator.market.books["binance"]
        start = dict(book.prices)
        queue = book.subscribe()
        changes = [await asyncio.wait_for(queue.get(), WAIT) for _ in range(len(start) * 3)]
        assert {change.symbol for change in changes if change} == set(start)
        assert book.prices != start
        assert abs(book.prices["BTCUSDT"] / start["BTCUSDT"] - 1) < Decimal("0.05")
        assert emulator.market.books["cbr"].prices["USD"] == Decimal("80.0000")  # daily rates


async def test_bybit_socket_speaks_op_subscribe_and_ping(emulator: EmulatorServer) -> None:
    async with connect(f"{emulator.ws_url('bybit')}/v5/public/spot") as ws:
        await ws.send(json.dumps({"req_id": "1", "op": "subscribe", "args": ["tickers.BTCUSDT"]}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert (ack["op"], ack["success"], ack["req_id"]) == ("subscribe", True, "1")
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert snapshot["topic"] == "tickers.BTCUSDT"
        assert snapshot["type"] == "snapshot"
        await ws.send(json.dumps({"req_id": "2", "op": "ping"}))
        pong = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert pong["ret_msg"] == "pong"
        too_many = [f"tickers.S{i}" for i in range(11)]
        await ws.send(json.dumps({"op": "subscribe", "args": too_many}))
        refused = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert refused["success"] is False


async def test_binance_socket_answers_live_subscriptions(emulator: EmulatorServer) -> None:
    async with connect(f"{emulator.ws_url('binance')}/stream?streams=btcusdt@miniTicker") as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert first["stream"] == "btcusdt@miniTicker"
        assert first["data"]["e"] == "24hrMiniTicker"
        await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["ethusdt@ticker"], "id": 1}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"result": None, "id": 1}
        await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 2}))
        listed = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert listed == {"result": ["btcusdt@miniTicker", "ethusdt@ticker"], "id": 2}


async def test_unknown_paths_answer_404(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    response = await emulator_client.get(f"{emulator.base_url}/kraken/0/public/Ticker")
    assert response.status_code == 404


def test_fault_flags_parse_like_the_control_api() -> None:
    provider, fault = parse_fault_flag("bybit=slow:delay=2")
    assert provider == "bybit"
    assert (fault.mode, fault.delay) == ("slow", 2.0)
    _, limited = parse_fault_flag("binance=rate_limited:status=418:retry_after=60")
    assert (limited.status, limited.retry_after) == (418, 60.0)
    assert parse_fault_flag("all=drop_stream")[0] == "all"
    for bad in ("binance", "kraken=down", "binance=melt", "binance=slow:delay"):
        with pytest.raises(ValueError, match="expected"):
            parse_fault_flag(bad)
    assert Fault.from_json({"mode": "absurd", "factor": "0"}).factor == 0
    skew = parse_fault_flag("coingecko=skew:percent=-2.5")[1]
    assert (skew.mode, skew.price_factor) == ("skew", Decimal("0.975"))


@pytest.mark.parametrize(("mode", "status"), [("down", 503), ("rate_limited", 429)])
async def test_a_refused_stream_gets_its_http_status_and_the_server_logs_no_error(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture, mode: str, status: int
) -> None:
    emulator.set_fault("bybit", mode)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{emulator.ws_url('bybit')}/v5/public/spot"):
            pass
    assert refused.value.response.status_code == status
    # uvicorn logged (or not) before the client could read the answer: same loop, one step.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_skew_moves_every_price_by_the_percentage_on_rest_and_streams(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    response = await emulator_client.post(
        f"{emulator.base_url}/_control/bybit", json={"mode": "skew", "percent": "-3"}
    )
    assert response.json()["fault"]["percent"] == "-3"
    emulator.set_fault("binance", "skew", percent=2)
    binance = await emulator_client.get(
        f"{emulator.base_url}/binance/api/v3/ticker/price", params={"symbol": "BTCUSDT"}
    )
    assert binance.json() == {"symbol": "BTCUSDT", "price": "91800.00000000"}
    bybit = await emulator_client.get(
        f"{emulator.base_url}/bybit/v5/market/tickers",
        params={"category": "spot", "symbol": "BTCUSDT"},
    )
    ticker = bybit.json()["result"]["list"][0]
    # Bybit's book starts at 90,018.00; -3 % at its tick size, bid below ask: a plausible quote.
    assert ticker["lastPrice"] == "87317.46"
    assert (
        Decimal(ticker["bid1Price"]) < Decimal(ticker["lastPrice"]) < Decimal(ticker["ask1Price"])
    )
    async with connect(f"{emulator.ws_url('binance')}/stream?streams=btcusdt@ticker") as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert first["data"]["c"] == "91800.00000000"
        emulator.market.books["binance"].set("BTCUSDT", Decimal("100000"))
        pushed = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert pushed["data"]["c"] == "102000.00000000"
    emulator.set_fault("cbr", "skew", percent="1.5")
    daily = await emulator_client.get(f"{emulator.base_url}/cbr/daily_json.js")
    assert json.loads(daily.text, parse_float=Decimal)["Valute"]["USD"]["Value"] == Decimal(
        "81.2000"
    )


@pytest.mark.parametrize("percent", ["51", "nan", "ten", True])
async def test_a_skew_beyond_plausible_is_refused(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient, percent: object
) -> None:
    response = await emulator_client.post(
        f"{emulator.base_url}/_control/binance", json={"mode": "skew", "percent": percent}
    )
    assert response.status_code == 422
    assert "percent" in response.json()["detail"]


async def test_depeg_prices_usdt_at_the_given_dollar_price_everywhere(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    base = emulator.base_url
    bitcoin_usd = emulator.market.books["coingecko"].prices["bitcoin.usd"]
    async with connect(f"{emulator.ws_url('binance')}/stream?streams=btcusdt@ticker") as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert first["data"]["c"] == "90000.00000000"
        response = await emulator_client.post(f"{base}/_control/depeg", json={"price": "0.97"})
        assert response.json() == {"usdt_usd": "0.97", "active": True}
        pushed = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        # 90,000 USD of bitcoin costs 90,000 / 0.97 USDT, at Binance's tick size.
        assert pushed["data"]["c"] == "92783.51000000"
    binance = await emulator_client.get(f"{base}/binance/api/v3/ticker/price")
    prices = {row["symbol"]: Decimal(row["price"]) for row in binance.json()}
    assert prices["ETHUSDT"] == Decimal("3092.78")
    assert prices["ETHBTC"] == Decimal("0.03333")  # no USDT leg: unchanged
    bybit = await emulator_client.get(
        f"{base}/bybit/v5/market/tickers", params={"category": "spot", "symbol": "BTCUSDT"}
    )
    assert Decimal(bybit.json()["result"]["list"][0]["lastPrice"]) == Decimal("92802.06")
    gecko = await emulator_client.get(
        f"{base}/coingecko/api/v3/simple/price",
        params={"ids": "bitcoin,tether", "vs_currencies": "usd"},
    )
    quotes = json.loads(gecko.text, parse_float=Decimal)
    assert quotes["tether"]["usd"] == Decimal("0.970303")  # 1.000312 × 0.97
    assert quotes["bitcoin"]["usd"] == bitcoin_usd  # the true USD price stays
    state = (await emulator_client.get(f"{base}/_control")).json()
    assert state["depeg"] == {"usdt_usd": "0.97", "active": True}
    await emulator_client.post(f"{base}/_control/reset")
    assert emulator.market.books["binance"].prices["BTCUSDT"] == Decimal("90000.00")
    assert (await emulator_client.get(f"{base}/_control/depeg")).json()["active"] is False


@pytest.mark.parametrize("price", ["0", "-1", "101", "abc", None])
async def test_a_depeg_price_out_of_range_is_refused(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient, price: object
) -> None:
    response = await emulator_client.post(
        f"{emulator.base_url}/_control/depeg", json={"price": price}
    )
    assert response.status_code == 422
    assert "price" in response.json()["detail"]
    assert emulator.market.usdt_usd == 1


async def test_an_emulator_can_start_depegged() -> None:
    async with run_emulator_server(tick=3600, depeg=Decimal("0.5")) as emulator:
        assert emulator.market.books["bybit"].prices["USDCUSDT"] == Decimal("2.0006")
        emulator.set_depeg("1")
        assert emulator.market.books["bybit"].prices["USDCUSDT"] == Decimal("1.0003")


def test_providers_walk_together_as_arbitrage_keeps_real_exchanges() -> None:
    market = Market(tick=1, seed=3)
    for _ in range(1000):  # a quarter of an hour of one-second ticks
        market.walk()
    binance, bybit = market.books["binance"].prices, market.books["bybit"].prices
    gecko = market.books["coingecko"].prices
    # The common walk moved BTC, yet the exchanges stay within basis points of each other
    # (Bybit starts 2 bp higher), and the stablecoins at their pegs.
    assert binance["BTCUSDT"] != Decimal("90000")
    assert binance["ETHUSDT"] != Decimal("3000")
    assert abs(bybit["BTCUSDT"] / binance["BTCUSDT"] - 1) < Decimal("0.001")
    assert abs(gecko["bitcoin.usd"] / binance["BTCUSDT"] - 1) < Decimal("0.001")
    assert abs(gecko["tether.usd"] - 1) < Decimal("0.002")
    assert abs(binance["ETHBTC"] - binance["ETHUSDT"] / binance["BTCUSDT"]) < Decimal("0.0001")
