"""Binance Spot: REST ``ticker/price`` + ``ticker/bookTicker`` and WebSocket combined streams.

Formats and traps: shared/reference/provider-formats.md sections 1-3. Binance has no RUB markets
(all RUB pairs were delisted in 2023-24), and no USD ones: USD pairs are served by the
``usd_proxy`` market (BTC-USD ← BTCUSDT, ``proxied=True``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from datetime import datetime
from typing import Any, ClassVar

import httpx

from rates.providers.base import (
    Listing,
    Pair,
    Provider,
    ProviderHTTPError,
    ProviderMalformed,
    Quote,
    decode_json,
    from_millis,
    optional_decimal,
    to_decimal,
    utc_now,
)

logger = logging.getLogger(__name__)

# Binance quote assets Kurs asks for. RUB is deliberately absent (delisted, see the module doc).
QUOTE_ASSETS = frozenset({"USDT", "USDC", "FDUSD", "BTC", "ETH", "BNB", "EUR", "TRY"})
# A symbol Binance does not list is left out of requests for this long, then tried again.
UNLISTED_RETRY_AFTER = 3600.0
# Header of the request weight the IP used in the current minute (provider-formats, section 1).
WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
TICKER_PATHS = ("/api/v3/ticker/price", "/api/v3/ticker/bookTicker")
# Streams named in the connection URL; the rest are asked for with SUBSCRIBE messages of this many
# each, so a thousand pairs do not make a 19 KB request line (servers refuse lines over 8 KB).
# Binance allows 1,024 streams per connection and 5 incoming messages per second.
STREAMS_PER_REQUEST = 200


class BinanceProvider(Provider):
    name: ClassVar[str] = "binance"
    supports_stream: ClassVar[bool] = True
    freshness: ClassVar[float | None] = None
    # "A single connection to stream.binance.com is only valid for 24 hours": leave 30 minutes of
    # margin so our reconnect is planned rather than a cut in the middle of a burst.
    connection_lifetime: ClassVar[float | None] = 23.5 * 3600
    # ticker/price and ticker/bookTicker for every symbol: weight 4 each.
    listing_requests: ClassVar[int] = 2
    listing_weight: ClassVar[int] = 8

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._unlisted: dict[str, float] = {}  # symbol -> monotonic time to ask again

    def supports(self, pair: Pair) -> bool:
        return self.market(pair, QUOTE_ASSETS) is not None

    def symbols_for(self, pairs: Sequence[Pair]) -> dict[str, list[tuple[Pair, bool]]]:
        """Exchange symbol → the Kurs pairs it serves (BTC-USD and BTC-USDT share BTCUSDT)."""
        wanted: dict[str, list[tuple[Pair, bool]]] = defaultdict(list)
        for pair in pairs:
            market = self.market(pair, QUOTE_ASSETS)
            if market is not None:
                base, quote, proxied = market
                wanted[base + quote].append((pair, proxied))
        return dict(wanted)

    async def fetch(self, pairs: Sequence[Pair]) -> list[Quote]:
        wanted = self.symbols_for(pairs)
        now = time.monotonic()
        self._unlisted = {sym: until for sym, until in self._unlisted.items() if until > now}
        asked = sorted(symbol for symbol in wanted if symbol not in self._unlisted)
        if not asked:
            return []
        # Binance rejects `symbols` with any space (server regex, error -1100): json.dumps' default
        # separators put a space after each comma, so spell the compact form explicitly.
        params: dict[str, str] | None = {"symbols": json.dumps(asked, separators=(",", ":"))}
        try:
            prices, books = await self._tickers(params)
        except ProviderHTTPError as exc:
            # One symbol Binance does not list fails the whole request (-1121 Invalid symbol):
            # ask for every ticker once, keep ours, and leave the unlisted ones out for a while,
            # so that one odd item never costs the other pairs their Binance quotes.
            if exc.status != 400 or "-1121" not in str(exc):
                raise
            params = None
            prices, books = await self._tickers(params)
            listed = {entry.get("symbol") for entry in prices if isinstance(entry, dict)}
            missing = [symbol for symbol in asked if symbol not in listed]
            for symbol in missing:
                self._unlisted[symbol] = now + UNLISTED_RETRY_AFTER
            logger.warning(
                "binance does not list %s; left out for an hour",
                ", ".join(missing),
                extra={"provider": self.name},
            )
        # ticker/price carries no timestamp; the arrival of the answer is the best bound we have
        # (the Date header only has one-second resolution).
        received = utc_now()
        return parse_rest(prices, books, wanted, received)

    async def listing(self) -> Listing:
        prices, books = await self._tickers(None)
        received = utc_now()
        parse_rest(prices, books, {}, received)  # the whole answer's shape, checked once
        price_by = {entry["symbol"]: entry for entry in prices}
        book_by = _by_symbol(books)

        def quotes(pairs: Sequence[Pair]) -> list[Quote]:
            wanted = {s: v for s, v in self.symbols_for(pairs).items() if s in price_by}
            listed_books = [book_by[symbol] for symbol in wanted if symbol in book_by]
            return parse_rest([price_by[s] for s in wanted], listed_books, wanted, received)

        return Listing(self.name, quotes)

    def request_weight(self, path: str, params: Mapping[str, str] | None) -> int:
        if path in TICKER_PATHS:
            return 2 if params and "symbol" in params else 4
        return 1

    def reported_weight(self, response: httpx.Response) -> int | None:
        raw = response.headers.get(WEIGHT_HEADER, "")
        return int(raw) if raw.isdigit() else None

    async def _tickers(self, params: dict[str, str] | None) -> tuple[Any, Any]:
        (prices, _), (books, _) = await asyncio.gather(
            self.get_json("/api/v3/ticker/price", params=params),
            self.get_json("/api/v3/ticker/bookTicker", params=params),
        )
        if not isinstance(prices, list):
            raise ProviderMalformed("ticker/price must be a JSON array")
        return prices, books

    async def stream(self, pairs: Sequence[Pair]) -> AsyncGenerator[Quote, None]:
        wanted = self.symbols_for(pairs)
        if not wanted or self.ws_url is None:
            return
        # `<symbol>@ticker` (1 s) is the one per-symbol stream that carries the last price (`c`),
        # an event time (`E`) and the best bid/ask (`b`/`a`): miniTicker has no bid/ask, and
        # bookTicker has neither a last price nor an event time.
        streams = [f"{symbol.lower()}@ticker" for symbol in sorted(wanted)]
        chunks = [
            streams[i : i + STREAMS_PER_REQUEST]
            for i in range(0, len(streams), STREAMS_PER_REQUEST)
        ]
        url = f"{self.ws_url}/stream?streams={'/'.join(chunks[0])}"
        subscribe = [
            json.dumps({"method": "SUBSCRIBE", "params": chunk, "id": number})
            for number, chunk in enumerate(chunks[1:], start=1)
        ]
        async with aclosing(self.ws_messages(url, subscribe=subscribe)) as messages:
            async for raw in messages:
                quotes = parse_stream_message(raw, wanted)
                if quotes is None:
                    # Binance announces a restart: end this connection, the caller reconnects.
                    return
                for quote in quotes:
                    yield quote

    def error_detail(self, response: httpx.Response) -> str:
        # Binance errors are {"code": -1121, "msg": "Invalid symbol."}.
        try:
            body = response.json()
        except ValueError:
            return super().error_detail(response)
        if isinstance(body, dict) and "msg" in body:
            return f": {body.get('code')} {body['msg']}"
        return super().error_detail(response)


def _quote(
    pair: Pair,
    proxied: bool,
    *,
    price: object,
    when: datetime,
    bid: object = None,
    ask: object = None,
) -> Quote:
    return Quote(
        provider=BinanceProvider.name,
        pair=pair.code,
        value=to_decimal(price),
        source_time=when,
        bid=optional_decimal(bid),
        ask=optional_decimal(ask),
        proxied=proxied,
    )


def parse_rest(
    prices: Any,
    books: Any,
    wanted: dict[str, list[tuple[Pair, bool]]],
    received: datetime,
) -> list[Quote]:
    """Quotes from the ``ticker/price`` and ``ticker/bookTicker`` arrays (prices are strings)."""
    if not isinstance(prices, list) or not isinstance(books, list):
        raise ProviderMalformed("ticker/price and bookTicker must be JSON arrays")
    book_by_symbol = _by_symbol(books)
    quotes: list[Quote] = []
    for entry in prices:
        if not isinstance(entry, dict) or "symbol" not in entry or "price" not in entry:
            raise ProviderMalformed(f"ticker/price entry without symbol/price: {entry!r:.80}")
        book = book_by_symbol.get(entry["symbol"], {})
        for pair, proxied in wanted.get(entry["symbol"], ()):
            quotes.append(
                _quote(
                    pair,
                    proxied,
                    price=entry["price"],
                    when=received,
                    bid=book.get("bidPrice"),
                    ask=book.get("askPrice"),
                )
            )
    return quotes


def _by_symbol(entries: list[Any]) -> dict[str, dict[str, Any]]:
    return {
        entry["symbol"]: entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("symbol"), str)
    }


def parse_stream_message(
    raw: str | bytes, wanted: dict[str, list[tuple[Pair, bool]]]
) -> list[Quote] | None:
    """Quotes from one combined-stream message; None for a ``serverShutdown`` event.

    Combined streams wrap each event as ``{"stream": ..., "data": {...}}``. Other messages on the
    socket (``{"result": null, "id": 1}`` acks) carry no quote and are skipped.
    """
    message = decode_json(raw, what="stream frame")
    if not isinstance(message, dict):
        raise ProviderMalformed(f"stream frame is not an object: {message!r:.80}")
    if "result" in message and "id" in message:
        return []
    data = message.get("data")
    if not isinstance(data, dict):
        raise ProviderMalformed(f"stream frame without a data object: {message!r:.80}")
    if data.get("e") == "serverShutdown":
        return None
    symbol, when = data.get("s"), from_millis(data.get("E"))
    if not isinstance(symbol, str) or when is None or "c" not in data:
        raise ProviderMalformed(f"ticker event without s/E/c: {data!r:.80}")
    return [
        _quote(pair, proxied, price=data["c"], when=when, bid=data.get("b"), ask=data.get("a"))
        for pair, proxied in wanted.get(symbol, ())
    ]
