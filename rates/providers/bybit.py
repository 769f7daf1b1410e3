"""Bybit v5 spot: REST ``/v5/market/tickers?category=spot`` and the public spot WebSocket.

Formats and traps: shared/reference/provider-formats.md section 5a. Bybit reports most API errors
in the body (HTTP 200 with ``retCode != 0``), rate limits included (``retCode`` 10006), and answers
an IP over its limit with HTTP 403 "access too frequent" (stop for 10 minutes). It lists no RUB
markets; USD pairs are served by the ``usd_proxy`` market like on Binance.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Sequence
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
    ProviderRateLimited,
    Quote,
    decode_json,
    from_millis,
    optional_decimal,
    to_decimal,
    utc_now,
)
from rates.upstream import weights

logger = logging.getLogger(__name__)

QUOTE_ASSETS = frozenset({"USDT", "USDC", "BTC", "EUR"})
RATE_LIMIT_CODE = 10006
# "Not supported symbols": asked for one symbol the exchange does not list (or an illegal param).
UNSUPPORTED_CODE = 10001
UNLISTED_RETRY_AFTER = 3600.0
# Spot accepts at most 10 args per subscribe request.
SUBSCRIBE_CHUNK = 10
# The client must ping every 20 s or Bybit drops the connection.
HEARTBEAT_SECONDS = 20.0
# After HTTP 403 "access too frequent" Bybit asks clients to stop for at least 10 minutes.
IP_BAN_SECONDS = 600.0

Wanted = dict[str, list[tuple[Pair, bool]]]


class BybitProvider(Provider):
    name: ClassVar[str] = "bybit"
    supports_stream: ClassVar[bool] = True
    freshness: ClassVar[float | None] = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._unlisted: dict[str, float] = {}  # symbol -> monotonic time to ask again

    def supports(self, pair: Pair) -> bool:
        return self.market(pair, QUOTE_ASSETS) is not None

    def symbols_for(self, pairs: Sequence[Pair]) -> Wanted:
        wanted: Wanted = defaultdict(list)
        for pair in pairs:
            market = self.market(pair, QUOTE_ASSETS)
            if market is not None:
                base, quote, proxied = market
                wanted[base + quote].append((pair, proxied))
        return dict(wanted)

    async def fetch(self, pairs: Sequence[Pair]) -> list[Quote]:
        wanted = self.symbols_for(pairs)
        if not wanted:
            return []
        # One symbol: ask for it alone. Several: one request for all spot tickers beats one
        # request per symbol (the endpoint takes a single `symbol`, never a list).
        params = {"category": "spot"}
        if len(wanted) == 1:
            params["symbol"] = next(iter(wanted))
        symbol = params.get("symbol")
        now = time.monotonic()
        if symbol is not None and self._unlisted.get(symbol, 0.0) > now:
            return []
        body, response = await self.get_json("/v5/market/tickers", params=params)
        if symbol is not None and _ret_code(body) == UNSUPPORTED_CODE:
            # Bybit does not list this one symbol: no quote from us, but no fault of the exchange
            # either, so it must not count against the breaker; ask again in an hour.
            self._unlisted[symbol] = now + UNLISTED_RETRY_AFTER
            logger.warning(
                "bybit does not list %s; left out for an hour",
                symbol,
                extra={"provider": self.name},
            )
            return []
        raise_for_ret_code(body, response)
        return parse_rest(body, wanted)

    async def listing(self) -> Listing:
        body, response = await self.get_json("/v5/market/tickers", params={"category": "spot"})
        raise_for_ret_code(body, response)
        parse_rest(body, {})  # the whole answer's shape, checked once
        by_symbol = {ticker["symbol"]: ticker for ticker in body["result"]["list"]}

        def quotes(pairs: Sequence[Pair]) -> list[Quote]:
            wanted = {s: v for s, v in self.symbols_for(pairs).items() if s in by_symbol}
            listed = {**body, "result": {"list": [by_symbol[symbol] for symbol in wanted]}}
            return parse_rest(listed, wanted)

        return Listing(self.name, quotes)

    async def stream(self, pairs: Sequence[Pair]) -> AsyncGenerator[Quote, None]:
        wanted = self.symbols_for(pairs)
        if not wanted or self.ws_url is None:
            return
        topics = [f"tickers.{symbol}" for symbol in sorted(wanted)]
        requests = itertools.count(1)
        subscribe = [
            json.dumps(
                {
                    "req_id": f"kurs-sub-{next(requests)}",
                    "op": "subscribe",
                    "args": topics[i : i + SUBSCRIBE_CHUNK],
                }
            )
            for i in range(0, len(topics), SUBSCRIBE_CHUNK)
        ]
        pings = itertools.count(1)
        state = TickerState(wanted)
        messages = self.ws_messages(
            f"{self.ws_url}/v5/public/spot",
            subscribe=subscribe,
            heartbeat=(
                HEARTBEAT_SECONDS,
                lambda: json.dumps({"req_id": f"kurs-ping-{next(pings)}", "op": "ping"}),
            ),
        )
        async with aclosing(messages):
            async for raw in messages:
                for quote in state.feed(raw):
                    yield quote

    def check_response(self, response: httpx.Response) -> None:
        if response.status_code == 403 and "too frequent" in response.text.lower():
            raise ProviderRateLimited(
                "HTTP 403 access too frequent (IP limit)", status=403, retry_after=IP_BAN_SECONDS
            )
        super().check_response(response)


def _ret_code(body: Any) -> object:
    return body.get("retCode") if isinstance(body, dict) else None


def raise_for_ret_code(body: Any, response: httpx.Response) -> None:
    """Bybit answers API errors with HTTP 200 and ``retCode != 0`` in the body."""
    if not isinstance(body, dict) or body.get("retCode", 0) == 0:
        return
    code, message = body.get("retCode"), body.get("retMsg", "")
    if code == RATE_LIMIT_CODE:
        # Reported with HTTP 200; surfaced as 429 so callers treat it like any other rate limit,
        # and on-demand keeps off Bybit until the reset (Provider.get_json only sees the 200).
        retry_after = reset_after(response)
        weights.hold(BybitProvider.name, retry_after)
        raise ProviderRateLimited(f"retCode {code} {message}", status=429, retry_after=retry_after)
    raise ProviderHTTPError(f"retCode {code} {message}", status=response.status_code)


def reset_after(response: httpx.Response) -> float | None:
    """Seconds until ``X-Bapi-Limit-Reset-Timestamp`` (epoch milliseconds), when sent."""
    reset = from_millis(response.headers.get("X-Bapi-Limit-Reset-Timestamp"))
    if reset is None:
        return None
    return max(0.0, (reset - utc_now()).total_seconds())


def _quote(pair: Pair, proxied: bool, ticker: dict[str, Any], when: datetime) -> Quote:
    return Quote(
        provider=BybitProvider.name,
        pair=pair.code,
        value=to_decimal(ticker.get("lastPrice")),
        source_time=when,
        bid=optional_decimal(ticker.get("bid1Price")),
        ask=optional_decimal(ticker.get("ask1Price")),
        proxied=proxied,
    )


def parse_rest(body: Any, wanted: Wanted) -> list[Quote]:
    """Quotes from a tickers answer; ``time`` (ms) at the top is the exchange's timestamp."""
    result = body.get("result") if isinstance(body, dict) else None
    tickers = result.get("list") if isinstance(result, dict) else None
    when = from_millis(body.get("time")) if isinstance(body, dict) else None
    if not isinstance(tickers, list) or when is None:
        raise ProviderMalformed(f"tickers body without result.list/time: {body!r:.80}")
    quotes: list[Quote] = []
    for ticker in tickers:
        if not isinstance(ticker, dict) or "symbol" not in ticker or "lastPrice" not in ticker:
            raise ProviderMalformed(f"ticker without symbol/lastPrice: {ticker!r:.80}")
        for pair, proxied in wanted.get(ticker["symbol"], ()):
            quotes.append(_quote(pair, proxied, ticker, when))
    return quotes


class TickerState:
    """Parses the spot socket's messages, merging ``delta`` pushes into the last ``snapshot``.

    Spot tickers are documented as snapshot-only, but other v5 categories send deltas carrying only
    the changed fields; merging keeps a delta without ``lastPrice`` from becoming a bogus quote.
    """

    def __init__(self, wanted: Wanted) -> None:
        self.wanted = wanted
        self.tickers: dict[str, dict[str, Any]] = {}

    def feed(self, raw: str | bytes) -> list[Quote]:
        message = decode_json(raw, what="stream frame")
        if not isinstance(message, dict):
            raise ProviderMalformed(f"stream frame is not an object: {message!r:.80}")
        if "op" in message:
            if message.get("op") == "subscribe" and message.get("success") is False:
                # One bad topic must not stop the others; REST polling still covers that pair.
                logger.warning(
                    "bybit: subscription rejected: %s",
                    message.get("ret_msg"),
                    extra={"provider": "bybit"},
                )
            return []  # subscribe acks and pongs
        topic, data = message.get("topic"), message.get("data")
        when = from_millis(message.get("ts"))
        if not isinstance(topic, str) or not isinstance(data, dict) or when is None:
            raise ProviderMalformed(f"stream frame without topic/data/ts: {message!r:.80}")
        if not topic.startswith("tickers."):
            return []
        symbol = data.get("symbol", topic.removeprefix("tickers."))
        if message.get("type") == "delta":
            ticker = {**self.tickers.get(symbol, {}), **data}
        else:
            ticker = dict(data)
        self.tickers[symbol] = ticker
        if "lastPrice" not in ticker:
            return []  # a delta before any snapshot: nothing to quote yet
        return [
            _quote(pair, proxied, ticker, when) for pair, proxied in self.wanted.get(symbol, ())
        ]
