"""The emulator as a plain ASGI application: every provider's real paths under its own prefix,
WebSocket streams, and the ``/_control`` API (see README.md in this package)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs

from rates.emulator import exchanges as fmt
from rates.emulator.exchanges import HttpResponse, json_response
from rates.emulator.market import (
    MODES,
    PROVIDERS,
    Fault,
    Market,
    PriceChange,
    now_ms,
    parse_depeg,
)

logger = logging.getLogger(__name__)

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Query = dict[str, list[str]]
RestHandler = Callable[[Query, Fault], HttpResponse]

# WebSocket close codes the emulator uses.
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
MAX_CONTROL_BODY = 64 * 1024


class EmulatorApp:
    def __init__(self, market: Market) -> None:
        self.market = market
        self.connections: dict[str, int] = dict.fromkeys(PROVIDERS, 0)
        self.closing = False
        # Totals for the shutdown summary line of run_emulator.
        self.served_requests = 0
        self.served_streams = 0
        # Set when a client sends an application-level ping (Bybit's {"op": "ping"}).
        self.pinged: dict[str, asyncio.Event] = {name: asyncio.Event() for name in PROVIDERS}
        self.client_pings: dict[str, int] = dict.fromkeys(PROVIDERS, 0)
        # Stream frames sent, by provider (what a scale benchmark compares with quotes accepted).
        self.frames_sent: dict[str, int] = dict.fromkeys(PROVIDERS, 0)
        self._walker: asyncio.Task[None] | None = None
        books = market.books
        self.rest: dict[tuple[str, str], RestHandler] = {
            ("binance", "/api/v3/ticker/price"): lambda q, f: fmt.binance_rest(
                books["binance"], "price", q, f
            ),
            ("binance", "/api/v3/ticker/bookTicker"): lambda q, f: fmt.binance_rest(
                books["binance"], "bookTicker", q, f
            ),
            ("binance", "/api/v3/ping"): lambda q, f: json_response({}),
            ("binance", "/api/v3/time"): lambda q, f: json_response({"serverTime": now_ms()}),
            ("bybit", "/v5/market/tickers"): lambda q, f: fmt.bybit_rest(books["bybit"], q, f),
            ("coingecko", "/api/v3/simple/price"): lambda q, f: fmt.coingecko_rest(
                books["coingecko"], q, f
            ),
            ("coingecko", "/api/v3/ping"): lambda q, f: json_response(
                {"gecko_says": "(V3) To the Moon!"}
            ),
            ("cbr", "/daily_json.js"): lambda q, f: fmt.cbr_daily(
                books["cbr"], max(books["cbr"].changed_ms.values()), f
            ),
        }
        self.rate_limited: dict[str, Callable[[Fault], HttpResponse]] = {
            "binance": fmt.binance_rate_limited,
            "bybit": fmt.bybit_rate_limited,
            "coingecko": fmt.coingecko_rate_limited,
            "cbr": lambda f: HttpResponse(
                f.status or 429, b"Too Many Requests", "text/plain", fmt.retry_after_header(f)
            ),
        }
        self.garbage_shape: dict[str, Callable[[Query], HttpResponse]] = {
            "binance": lambda q: fmt.binance_garbage_shape(),
            "bybit": lambda q: fmt.bybit_garbage_shape(),
            "coingecko": fmt.coingecko_garbage_shape,
            "cbr": lambda q: fmt.cbr_garbage_shape(),
        }

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._walker = asyncio.create_task(self.market.run_walk(), name="emulator-walk")

    async def stop(self) -> None:
        """Stop the walk and close every stream (so the server's graceful shutdown is quick)."""
        self.closing = True
        if self._walker is not None:
            self._walker.cancel()
            with suppress(asyncio.CancelledError):
                await self._walker
        for book in self.market.books.values():
            book.wake()

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        raw_query = scope.get("query_string", b"").decode("latin-1")
        query = parse_qs(raw_query, keep_blank_values=True)
        body = await read_body(receive)
        if path == "/_control" or path.startswith("/_control/"):
            response = self.control(method, path.removeprefix("/_control").strip("/"), query, body)
        else:
            provider, _, rest = path.lstrip("/").partition("/")
            handler = self.rest.get((provider, "/" + rest))
            if handler is None:
                response = json_response({"detail": f"no such endpoint: {path}"}, 404)
            elif method != "GET":
                response = json_response({"detail": f"{method} not allowed"}, 405)
            else:
                self.market.log_request(provider, method, "/" + rest, raw_query)
                self.served_requests += 1
                response = await self.provider_response(provider, handler, query)
                if provider == "binance":
                    response = self.binance_weight(rest, query, response)
        await send_response(send, response)

    async def provider_response(
        self, provider: str, handler: RestHandler, query: Query
    ) -> HttpResponse:
        fault = self.market.faults[provider]
        if fault.mode == "slow":
            await asyncio.sleep(fault.delay)
        if fault.mode == "down":
            return fmt.down_response(fault)
        if fault.mode == "rate_limited":
            return self.rate_limited[provider](fault)
        if fault.mode == "garbage":
            if fault.variant == "text":
                return fmt.garbage_text_response()
            return self.garbage_shape[provider](query)
        return handler(query, fault)

    def binance_weight(self, path: str, query: Query, response: HttpResponse) -> HttpResponse:
        """The answer with the minute's used weight, as Binance counts it per IP: tickers weigh 2
        for one `symbol` and 4 otherwise, ping and time 1. A rate-limited answer keeps its own."""
        if response.status in (418, 429):
            return response
        weight = (2 if "symbol" in query else 4) if path.startswith("api/v3/ticker/") else 1
        used = str(self.market.spend_binance_weight(weight))
        headers = [(k, v) for k, v in response.headers if not k.startswith("X-MBX-USED-WEIGHT")]
        headers += [("X-MBX-USED-WEIGHT-1M", used), ("X-MBX-USED-WEIGHT", used)]
        return dataclasses.replace(response, headers=headers)

    # --- control API ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "providers": {
                name: {
                    **self.market.faults[name].to_json(),
                    "connections": self.connections[name],
                    "client_pings": self.client_pings[name],
                    "frames_sent": self.frames_sent[name],
                }
                for name in PROVIDERS
            },
            "tick": self.market.tick,
            "modes": list(MODES),
            "depeg": self.depeg_state(),
        }

    def depeg_state(self) -> dict[str, Any]:
        return {"usdt_usd": str(self.market.usdt_usd), "active": self.market.usdt_usd != 1}

    def control(self, method: str, route: str, query: Query, body: bytes) -> HttpResponse:
        parts = route.split("/") if route else []
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            return json_response({"detail": "body is not JSON"}, 400)
        if not isinstance(data, dict):
            return json_response({"detail": "body must be a JSON object"}, 400)
        match method, parts:
            case "GET", []:
                return json_response(self.state())
            case "POST", ["reset"]:
                self.market.set_fault("all", Fault())
                self.market.set_depeg(Decimal(1))
                return json_response(self.state())
            case "GET", ["depeg"]:
                return json_response(self.depeg_state())
            case "POST", ["depeg"]:
                try:
                    price = parse_depeg(data.get("price", "1"))
                except ValueError as exc:
                    return json_response({"detail": str(exc)}, 422)
                self.market.set_depeg(price)
                logger.info("emulator: USDT trades at %s USD", price)
                return json_response(self.depeg_state())
            case "GET", ["requests"]:
                wanted = query.get("provider", [None])[0]
                rows = [r.to_json() for r in self.market.requests if wanted in (None, r.provider)]
                counts = dict(self.market.request_counts)
                return json_response({"requests": rows, "counts": counts})
            case "DELETE", ["requests"]:
                self.market.clear_requests()
                return HttpResponse(204, b"")
            case "GET", [provider] if provider in PROVIDERS:
                book = self.market.books[provider]
                return json_response(
                    {
                        "provider": provider,
                        "fault": self.market.faults[provider].to_json(),
                        "connections": self.connections[provider],
                        "prices": {symbol: str(price) for symbol, price in book.prices.items()},
                    }
                )
            case "POST", [provider] if provider in (*PROVIDERS, "all"):
                try:
                    fault = Fault.from_json(data)
                except ValueError as exc:
                    return json_response({"detail": str(exc)}, 422)
                self.market.set_fault(provider, fault)
                logger.info("emulator: %s -> %s", provider, fault.mode)
                return json_response({"provider": provider, "fault": fault.to_json()})
            case "POST", [provider, "price"] if provider in PROVIDERS:
                return self.set_price(provider, data)
        return json_response({"detail": f"no such control route: {method} /_control/{route}"}, 404)

    def set_price(self, provider: str, data: Mapping[str, Any]) -> HttpResponse:
        book = self.market.books[provider]
        symbol = data.get("symbol")
        if symbol not in book.prices:
            known = ", ".join(sorted(book.prices))
            return json_response({"detail": f"symbol: expected one of {known}"}, 422)
        try:
            price = Decimal(str(data.get("price")))
        except InvalidOperation:
            return json_response({"detail": "price: expected a decimal string"}, 422)
        if not price.is_finite():
            return json_response({"detail": "price: expected a finite decimal"}, 422)
        change = book.set(symbol, price)
        changed_at = datetime.fromtimestamp(change.time_ms / 1000, tz=UTC)
        return json_response(
            {
                "provider": provider,
                "symbol": symbol,
                "price": str(price),
                "changed_at": changed_at.isoformat().replace("+00:00", "Z"),
                "changed_at_ms": change.time_ms,
            }
        )

    # --- WebSocket ------------------------------------------------------------------------

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        path: str = scope["path"]
        provider, _, rest = path.lstrip("/").partition("/")
        raw_query = scope.get("query_string", b"").decode("latin-1")
        if (provider, rest) == ("binance", "stream"):
            streams = fmt.binance_stream_names(parse_qs(raw_query).get("streams", [""])[0])
            session: StreamSession = BinanceSession(self, send, streams)
        elif (provider, rest) == ("bybit", "v5/public/spot"):
            session = BybitSession(self, send)
        else:
            await deny(scope, send, 404, b"no such stream")
            return
        self.market.log_request(provider, "WS", "/" + rest, raw_query)
        fault = self.market.faults[provider]
        if fault.mode == "slow":
            await asyncio.sleep(fault.delay)
        if fault.mode == "down":
            await deny(scope, send, fault.status or 503, b"Service Temporarily Unavailable")
            return
        if fault.mode == "rate_limited":
            headers = fmt.retry_after_header(fault)
            await deny(scope, send, fault.status or 429, b"Too Many Requests", headers)
            return
        await send({"type": "websocket.accept"})
        self.served_streams += 1
        if fault.mode == "drop_stream":
            # A flaky load balancer: the upgrade succeeds, then the connection dies at once.
            await send({"type": "websocket.close", "code": CLOSE_INTERNAL_ERROR})
            return
        self.connections[provider] += 1
        try:
            await session.run(receive)
        finally:
            self.connections[provider] -= 1


class StreamSession:
    """One stream connection: a reader for client messages, a pusher for price changes."""

    provider: str

    def __init__(self, app: EmulatorApp, send: Send) -> None:
        self.app = app
        self.book = app.market.books[self.provider]
        self._send = send
        self._lock = asyncio.Lock()

    @property
    def fault(self) -> Fault:
        return self.app.market.faults[self.provider]

    async def send_text(self, text: str) -> None:
        # Reader and pusher both send; one frame at a time on the socket.
        async with self._lock:
            await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        async with self._lock:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def run(self, receive: Receive) -> None:
        queue = self.book.subscribe()
        reader = asyncio.create_task(self.read(receive))
        pusher = asyncio.create_task(self.push(queue))
        try:
            await asyncio.wait({reader, pusher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.book.unsubscribe(queue)
            for task in (reader, pusher):
                task.cancel()
                with suppress(asyncio.CancelledError, OSError):
                    await task

    async def read(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = message["bytes"].decode("utf-8", "replace")
            if text is not None:
                await self.on_client_message(text)

    async def push(self, queue: asyncio.Queue[PriceChange | None]) -> None:
        if self.fault.mode != "stale":
            await self.send_initial()
        while True:
            if self.app.closing:
                await self.close(CLOSE_GOING_AWAY, "emulator shutting down")
                return
            if self.fault.mode in ("drop_stream", "down"):
                await self.close(CLOSE_INTERNAL_ERROR, f"emulator: {self.fault.mode}")
                return
            change = await queue.get()
            # A stale provider's stream stays open and says nothing (a stalled feed).
            if change is not None and self.fault.mode != "stale":
                for frame in self.frames(change):
                    await self.send_frame(frame, change.symbol)

    async def send_frame(self, frame: str, symbol: str) -> None:
        fault = self.fault
        if fault.mode == "slow":
            await asyncio.sleep(fault.delay)
        if fault.mode == "garbage":
            # "text": a frame torn in half (invalid JSON); "shape": valid JSON, wrong layout.
            frame = frame[: len(frame) // 2] if fault.variant == "text" else self.garbage(symbol)
        await self.send_text(frame)
        self.app.frames_sent[self.provider] += 1

    def factor(self) -> Decimal:
        return fmt.factor_of(self.fault)

    def current(self, symbol: str) -> PriceChange:
        return PriceChange(symbol, self.book.prices[symbol], self.book.changed_ms[symbol])

    async def send_initial(self) -> None:
        """Frames sent as soon as the connection opens (none by default)."""

    async def on_client_message(self, text: str) -> None:
        raise NotImplementedError

    def frames(self, change: PriceChange) -> list[str]:
        raise NotImplementedError

    def garbage(self, symbol: str) -> str:
        raise NotImplementedError


class BinanceSession(StreamSession):
    """``/stream?streams=...``: combined-stream wrapper; live SUBSCRIBE/UNSUBSCRIBE work too."""

    provider = "binance"

    def __init__(self, app: EmulatorApp, send: Send, streams: list[tuple[str, str, str]]) -> None:
        super().__init__(app, send)
        self.streams = streams
        self.index_streams()

    def index_streams(self) -> None:
        """Each symbol's streams, so a price change finds its frames without a scan of them all."""
        self.by_symbol: dict[str, list[tuple[str, str]]] = {}
        for stream, symbol, kind in self.streams:
            self.by_symbol.setdefault(symbol, []).append((stream, kind))

    async def send_initial(self) -> None:
        # Real Binance sends the first ticker within a second; sending it at once keeps tests fast.
        for stream, symbol, _ in list(self.streams):
            if symbol in self.book.prices:
                for frame in self.frames(self.current(symbol), only=stream):
                    await self.send_frame(frame, symbol)

    def frames(self, change: PriceChange, only: str | None = None) -> list[str]:
        return [
            fmt.binance_frame(stream, fmt.binance_event(self.book, change, kind, self.factor()))
            for stream, kind in self.by_symbol.get(change.symbol, ())
            if only in (None, stream)
        ]

    def garbage(self, symbol: str) -> str:
        return fmt.binance_garbage_frame(f"{symbol.lower()}@ticker")

    async def on_client_message(self, text: str) -> None:
        try:
            request = json.loads(text)
        except ValueError:
            await self.send_text(json.dumps({"code": 3, "msg": "Invalid JSON: expected value"}))
            return
        method = request.get("method") if isinstance(request, dict) else None
        request_id = request.get("id") if isinstance(request, dict) else None
        params = request.get("params", []) if isinstance(request, dict) else []
        if method == "SUBSCRIBE":
            known = {stream for stream, _, _ in self.streams}
            for name in fmt.binance_stream_names("/".join(params)):
                if name[0] not in known:
                    self.streams.append(name)
            self.index_streams()
            await self.send_text(json.dumps({"result": None, "id": request_id}))
        elif method == "UNSUBSCRIBE":
            self.streams = [s for s in self.streams if s[0] not in set(params)]
            self.index_streams()
            await self.send_text(json.dumps({"result": None, "id": request_id}))
        elif method == "LIST_SUBSCRIPTIONS":
            result = [stream for stream, _, _ in self.streams]
            await self.send_text(json.dumps({"result": result, "id": request_id}))
        else:
            message = {"code": 2, "msg": f"Invalid request: unknown method {method!r}"}
            await self.send_text(json.dumps({**message, "id": request_id}))


class BybitSession(StreamSession):
    """``/v5/public/spot``: ``op`` subscribe/unsubscribe/ping, ``tickers.<SYMBOL>`` snapshots."""

    provider = "bybit"
    MAX_ARGS = 10

    def __init__(self, app: EmulatorApp, send: Send) -> None:
        super().__init__(app, send)
        self.topics: set[str] = set()

    def frames(self, change: PriceChange) -> list[str]:
        if f"tickers.{change.symbol}" not in self.topics:
            return []
        return [fmt.bybit_frame(self.book, change, self.factor())]

    def garbage(self, symbol: str) -> str:
        return fmt.bybit_garbage_frame(symbol)

    async def on_client_message(self, text: str) -> None:
        try:
            request = json.loads(text)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            await self.send_text(fmt.bybit_ack("", None, False, "Invalid request"))
            return
        op, req_id = request.get("op"), request.get("req_id")
        args = request.get("args") or []
        if op == "ping":
            self.app.client_pings[self.provider] += 1
            self.app.pinged[self.provider].set()
            await self.send_text(fmt.bybit_ack("ping", req_id, True, "pong"))
        elif op == "subscribe":
            await self.subscribe(args, req_id)
        elif op == "unsubscribe":
            self.topics.difference_update(args)
            await self.send_text(fmt.bybit_ack("unsubscribe", req_id))
        else:
            await self.send_text(fmt.bybit_ack(str(op), req_id, False, f"Invalid op {op!r}"))

    async def subscribe(self, args: list[str], req_id: str | None) -> None:
        if len(args) > self.MAX_ARGS:
            message = f"args size >{self.MAX_ARGS}"
            await self.send_text(fmt.bybit_ack("subscribe", req_id, False, message))
            return
        unknown = [t for t in args if t.removeprefix("tickers.") not in self.book.prices]
        if unknown or not args:
            message = f"Invalid symbol :[{','.join(unknown)}]"
            await self.send_text(fmt.bybit_ack("subscribe", req_id, False, message))
            return
        new = [topic for topic in args if topic not in self.topics]
        self.topics.update(args)
        await self.send_text(fmt.bybit_ack("subscribe", req_id))
        for topic in new:
            symbol = topic.removeprefix("tickers.")
            for frame in self.frames(self.current(symbol)):
                await self.send_frame(frame, symbol)


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= MAX_CONTROL_BODY:
            chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def send_response(send: Send, response: HttpResponse) -> None:
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def deny(
    scope: Scope,
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    """Refuse a WebSocket upgrade with an HTTP answer where the server supports it."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers or []],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": CLOSE_INTERNAL_ERROR})
