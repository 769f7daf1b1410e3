"""Each exchange's real payloads, as the emulator sends them (shared/reference/provider-formats.md).

Pure functions from a :class:`~rates.emulator.market.Book` (and the request) to a response body
or a stream frame. The fault switches that change a payload (absurd prices, garbage, rate-limit
answers) live here too, next to the format they imitate.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from typing import Any

from rates.emulator.market import CBR_IDS, CBR_TABLE, Book, Fault, PriceChange, now_ms

JSON = "application/json"
MSK = timezone(timedelta(hours=3))
EIGHT_PLACES = Decimal("1E-8")
# The server-side check behind Binance error -1100 (ccxt/go-binance#267): no spaces allowed.
BINANCE_SYMBOLS_RE = re.compile(r'^\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\]$')
BINANCE_429_MSG = (
    "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. "
    "Please use WebSocket Streams for live updates to avoid polling the API."
)
COINGECKO_429_MSG = (
    "You've exceeded the Rate Limit. Please visit https://www.coingecko.com/en/api/pricing to "
    "subscribe to our API plans for higher rate limits."
)
DOWN_HTML = (
    "<html><head><title>{status} Service Temporarily Unavailable</title></head><body>"
    "<center><h1>{status} Service Temporarily Unavailable</h1></center></body></html>"
)


@dataclass
class HttpResponse:
    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


def render_json(value: Any) -> str:
    """JSON where Decimals are written as numbers with all their digits (CoinGecko, CBR)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(render_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def json_response(
    value: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()
) -> HttpResponse:
    return HttpResponse(status, render_json(value).encode(), JSON, list(headers))


def retry_after_header(fault: Fault) -> list[tuple[str, str]]:
    # Retry-After is whole seconds on the wire.
    return [] if fault.retry_after is None else [("Retry-After", str(math.ceil(fault.retry_after)))]


def down_response(fault: Fault) -> HttpResponse:
    status = fault.status or 503
    return HttpResponse(status, DOWN_HTML.format(status=status).encode(), "text/html")


def garbage_text_response() -> HttpResponse:
    # A proxy's maintenance page served with 200 and a JSON content type: the classic trap.
    return HttpResponse(200, b"<html><body>Scheduled maintenance, back soon</body></html>")


def factor_of(fault: Fault) -> Decimal:
    return fault.price_factor


def times(value: Decimal, factor: Decimal, tick: Decimal) -> Decimal:
    """``value × factor`` at the exchange's tick size (a skewed price looks like a real one)."""
    return value if factor == 1 else (value * factor).quantize(tick)


def quantum(book: Book, symbol: str) -> Decimal:
    return Decimal(1).scaleb(-book.decimals[symbol])


def bid_ask(book: Book, symbol: str, price: Decimal) -> tuple[Decimal, Decimal]:
    """A spread of about one basis point, at least one tick each side."""
    q = quantum(book, symbol)
    half = price * Decimal("0.00005")
    bid = min(price - q, (price - half).quantize(q, ROUND_DOWN))
    ask = max(price + q, (price + half).quantize(q, ROUND_UP))
    return bid, ask


# --- Binance --------------------------------------------------------------------------------


def binance_error(status: int, code: int, msg: str) -> HttpResponse:
    return json_response({"code": code, "msg": msg}, status)


def binance_symbols(book: Book, query: Mapping[str, list[str]]) -> list[str] | HttpResponse:
    """The symbols asked for, or the error Binance would answer."""
    if "symbol" in query and "symbols" in query:
        return binance_error(400, -1128, "Combination of optional parameters invalid.")
    if "symbol" in query:
        requested = [query["symbol"][0]]
    elif "symbols" in query:
        raw = query["symbols"][0]
        if not BINANCE_SYMBOLS_RE.match(raw):
            return binance_error(
                400,
                -1100,
                "Illegal characters found in parameter 'symbols'; legal range is "
                f"'{BINANCE_SYMBOLS_RE.pattern}'.",
            )
        requested = json.loads(raw)
    else:
        return sorted(book.prices)
    if any(symbol not in book.prices for symbol in requested):
        return binance_error(400, -1121, "Invalid symbol.")
    return requested


def binance_rest(
    book: Book, kind: str, query: Mapping[str, list[str]], fault: Fault
) -> HttpResponse:
    """``ticker/price`` or ``ticker/bookTicker``: an object for ``symbol``, else an array."""
    symbols = binance_symbols(book, query)
    if isinstance(symbols, HttpResponse):
        return symbols
    factor = factor_of(fault)
    rows: list[dict[str, str]] = []
    for symbol in symbols:
        price = book.prices[symbol]
        if kind == "price":
            rows.append({"symbol": symbol, "price": _eight(price * factor)})
        else:
            bid, ask = bid_ask(book, symbol, price)
            rows.append(
                {
                    "symbol": symbol,
                    "bidPrice": _eight(bid * factor),
                    "bidQty": "1.25000000",
                    "askPrice": _eight(ask * factor),
                    "askQty": "0.75000000",
                }
            )
    weight = [("X-MBX-USED-WEIGHT-1M", "4"), ("X-MBX-USED-WEIGHT", "4")]
    return json_response(rows[0] if "symbol" in query else rows, headers=weight)


def binance_rate_limited(fault: Fault) -> HttpResponse:
    status = fault.status or 429
    msg = (
        BINANCE_429_MSG
        if status != 418
        else "Way too much request weight used; IP banned until 1770123456789. "
        "Please use WebSocket Streams for live updates to avoid bans."
    )
    headers = [*retry_after_header(fault), ("X-MBX-USED-WEIGHT-1M", "6004")]
    return json_response({"code": -1003, "msg": msg}, status, headers)


def binance_garbage_shape() -> HttpResponse:
    return json_response({"code": 0, "msg": "ok", "data": None})


def _eight(value: Decimal) -> str:
    return format(value.quantize(EIGHT_PLACES), "f")


def binance_stream_names(raw: str) -> list[tuple[str, str, str]]:
    """``btcusdt@ticker/ethusdt@miniTicker`` → [(stream, SYMBOL, kind)]."""
    names = []
    for stream in filter(None, raw.split("/")):
        symbol, _, kind = stream.partition("@")
        names.append((stream, symbol.upper(), kind))
    return names


def binance_event(book: Book, change: PriceChange, kind: str, factor: Decimal) -> dict[str, Any]:
    price = change.price
    bid, ask = bid_ask(book, change.symbol, price)
    if kind == "bookTicker":
        # Real bookTicker events carry no event type and no event time.
        return {
            "u": change.time_ms,
            "s": change.symbol,
            "b": _eight(bid * factor),
            "B": "1.25000000",
            "a": _eight(ask * factor),
            "A": "0.75000000",
        }
    common = {
        "E": change.time_ms,
        "s": change.symbol,
        "c": _eight(price * factor),
        "o": _eight(price * factor),
        "h": _eight(price * factor),
        "l": _eight(price * factor),
        "v": "1000.00000000",
        "q": _eight(price * factor * 1000),
    }
    if kind == "miniTicker":
        return {"e": "24hrMiniTicker", **common}
    return {
        "e": "24hrTicker",
        **common,
        "p": "0.00000000",
        "P": "0.000",
        "w": _eight(price * factor),
        "x": _eight(price * factor),
        "Q": "0.01000000",
        "b": _eight(bid * factor),
        "B": "1.25000000",
        "a": _eight(ask * factor),
        "A": "0.75000000",
        "O": change.time_ms - 86_400_000,
        "C": change.time_ms,
        "F": 0,
        "L": 18150,
        "n": 18151,
    }


def binance_frame(stream: str, event: dict[str, Any]) -> str:
    return render_json({"stream": stream, "data": event})


def binance_garbage_frame(stream: str) -> str:
    return render_json({"stream": stream, "data": "unexpected"})


# --- Bybit ----------------------------------------------------------------------------------


def bybit_ticker(book: Book, symbol: str, factor: Decimal, *, rest: bool) -> dict[str, str]:
    price = book.prices[symbol]
    q = quantum(book, symbol)
    last = str(times(price, factor, q))
    ticker = {
        "symbol": symbol,
        "lastPrice": last,
        "prevPrice24h": last,
        "price24hPcnt": "0.0000",
        "highPrice24h": last,
        "lowPrice24h": last,
        "turnover24h": str((price * factor * 1000).quantize(q)),
        "volume24h": "1000.000000",
        "usdIndexPrice": last,
    }
    if rest:
        bid, ask = bid_ask(book, symbol, price)
        ticker |= {
            "bid1Price": str(times(bid, factor, q)),
            "bid1Size": "2",
            "ask1Price": str(times(ask, factor, q)),
            "ask1Size": "1.862172",
        }
    return ticker


def bybit_envelope(
    result: Any, ret_code: int = 0, ret_msg: str = "OK", *, time_ms: int | None = None
) -> dict[str, Any]:
    return {
        "retCode": ret_code,
        "retMsg": ret_msg,
        "result": result,
        "retExtInfo": {},
        "time": now_ms() if time_ms is None else time_ms,
    }


def bybit_rest(book: Book, query: Mapping[str, list[str]], fault: Fault) -> HttpResponse:
    category = query.get("category", [""])[0]
    if category != "spot":
        return json_response(bybit_envelope({}, 10001, "Illegal category"))
    symbols = query.get("symbol", [])
    if symbols and symbols[0] not in book.prices:
        return json_response(bybit_envelope({}, 10001, "Not supported symbols"))
    wanted = symbols or sorted(book.prices)
    factor = factor_of(fault)
    tickers = [bybit_ticker(book, symbol, factor, rest=True) for symbol in wanted]
    envelope = bybit_envelope({"category": "spot", "list": tickers}, time_ms=fault.frozen_ms)
    return json_response(envelope)


def bybit_rate_limited(fault: Fault) -> HttpResponse:
    if fault.status == 403:
        return HttpResponse(403, b"access too frequent", "text/plain")
    # Bybit reports its API rate limit in the body of an HTTP 200, with the reset time in a header.
    headers = [("X-Bapi-Limit", "600"), ("X-Bapi-Limit-Status", "0")]
    if fault.retry_after is not None:
        reset = now_ms() + int(fault.retry_after * 1000)
        headers.append(("X-Bapi-Limit-Reset-Timestamp", str(reset)))
    return json_response(bybit_envelope({}, 10006, "Too many visits!"), headers=headers)


def bybit_garbage_shape() -> HttpResponse:
    return json_response(bybit_envelope({"category": "spot"}))


def bybit_ack(op: str, req_id: str | None, success: bool = True, ret_msg: str = "") -> str:
    message: dict[str, Any] = {
        "success": success,
        "ret_msg": ret_msg or op,
        "conn_id": str(uuid.uuid4()),
        "op": op,
    }
    if req_id is not None:
        message["req_id"] = req_id
    return render_json(message)


def bybit_frame(book: Book, change: PriceChange, factor: Decimal) -> str:
    return render_json(
        {
            "topic": f"tickers.{change.symbol}",
            "ts": change.time_ms,
            "type": "snapshot",
            "cs": change.time_ms,
            "data": bybit_ticker(book, change.symbol, factor, rest=False),
        }
    )


def bybit_garbage_frame(symbol: str) -> str:
    return render_json({"topic": f"tickers.{symbol}", "ts": now_ms(), "data": [1, 2, 3]})


# --- CoinGecko ------------------------------------------------------------------------------


def coingecko_rest(book: Book, query: Mapping[str, list[str]], fault: Fault) -> HttpResponse:
    if "vs_currencies" not in query:
        return json_response({"error": "Missing parameter vs_currencies"}, 400)
    ids = _csv(query.get("ids", []))
    vs_currencies = _csv(query["vs_currencies"])
    with_time = query.get("include_last_updated_at", ["false"])[0] == "true"
    factor = factor_of(fault)
    body: dict[str, dict[str, Any]] = {}
    for coin in ids:
        prices = {
            vs: book.prices[f"{coin}.{vs}"] * factor
            for vs in vs_currencies
            if f"{coin}.{vs}" in book.prices
        }
        if not prices:
            continue  # CoinGecko silently leaves out ids it does not know
        entry: dict[str, Any] = dict(prices)
        if with_time:
            latest = max(book.changed_ms[f"{coin}.{vs}"] for vs in prices)
            entry["last_updated_at"] = latest // 1000
        body[coin] = entry
    return json_response(body)


def coingecko_rate_limited(fault: Fault) -> HttpResponse:
    body = {"status": {"error_code": 429, "error_message": COINGECKO_429_MSG}}
    return json_response(body, fault.status or 429, retry_after_header(fault))


def coingecko_garbage_shape(query: Mapping[str, list[str]]) -> HttpResponse:
    return json_response({coin: [1, 2] for coin in _csv(query.get("ids", [])) or ["bitcoin"]})


def _csv(values: Iterable[str]) -> list[str]:
    return [item.strip().lower() for value in values for item in value.split(",") if item.strip()]


# --- CBR ------------------------------------------------------------------------------------


def cbr_daily(book: Book, published_ms: int, fault: Fault) -> HttpResponse:
    """The cbr-xml-daily.ru file: ``Date`` is the effective day (the next one at 11:30 MSK)."""
    published = datetime.fromtimestamp(published_ms / 1000, tz=UTC).astimezone(MSK)
    effective = (published + timedelta(days=1)).replace(hour=11, minute=30, second=0, microsecond=0)
    previous = effective - timedelta(days=1)
    factor = factor_of(fault)
    valute = {}
    for code, (start, nominal, name) in CBR_TABLE.items():
        record_id, num_code = CBR_IDS[code]
        valute[code] = {
            "ID": record_id,
            "NumCode": num_code,
            "CharCode": code,
            "Nominal": nominal,
            "Name": name,
            "Value": times(book.prices[code], factor, quantum(book, code)),
            "Previous": Decimal(start),
        }
    body = {
        "Date": effective.isoformat(),
        "PreviousDate": previous.isoformat(),
        "PreviousURL": f"//www.cbr-xml-daily.ru/archive/{previous:%Y/%m/%d}/daily_json.js",
        "Timestamp": published.replace(microsecond=0).isoformat(),
        "Valute": valute,
    }
    return HttpResponse(200, render_json(body).encode(), "application/javascript; charset=utf-8")


def cbr_garbage_shape() -> HttpResponse:
    return json_response({"Date": datetime.now(MSK).isoformat(), "Valute": ["USD"]})
