"""The provider interface shared by every exchange module, and the plumbing they have in common.

Everything here is plain asyncio + httpx + websockets: nothing imports Django, so providers can be
built and tested without configured settings. Each exchange module owns the parsing of its own
payloads; this module only turns transport-level failures into :class:`ProviderError` subclasses.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from typing import Any, ClassVar

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from rates.upstream import weights

logger = logging.getLogger(__name__)

NAN = Decimal("NaN")

# What reusing a connection the server already closed raises: httpcore discards a connection it
# sees closed, so these are the close racing our request, or an RST on an idle connection.
STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

# Fiat currencies never appear as the base of an exchange's crypto market. Used to refuse pairs such
# as AUD-CAD on crypto exchanges (they would ask for a non-existent "AUDCAD" symbol, and Binance
# answers a whole multi-symbol request with -1121 when one symbol is unknown).
FIAT_CODES = frozenset(
    [
        "USD",
        "EUR",
        "RUB",
        "GBP",
        "JPY",
        "CNY",
        "AUD",
        "CAD",
        "CHF",
        "KZT",
        "AMD",
        "BYN",
        "UAH",
        "TRY",
        "INR",
        "BRL",
        "HKD",
        "SGD",
        "SEK",
        "NOK",
        "PLN",
        "CZK",
        "HUF",
        "DKK",
        "KRW",
        "ZAR",
        "AED",
        "UZS",
        "KGS",
        "TJS",
        "AZN",
        "GEL",
        "MDL",
        "RON",
        "BGN",
        "NZD",
        "THB",
        "VND",
        "IDR",
        "EGP",
        "QAR",
        "RSD",
    ]
)


@dataclass(frozen=True, slots=True)
class Pair:
    """A pair as Kurs asks for it, in Kurs asset codes (before any alias or proxy mapping)."""

    base: str
    quote: str

    @property
    def code(self) -> str:
        return f"{self.base}-{self.quote}"

    @classmethod
    def parse(cls, code: str) -> Pair:
        base, sep, quote = code.strip().upper().partition("-")
        if not sep or not base or not quote:
            raise ValueError(f"expected BASE-QUOTE, got {code!r}")
        return cls(base, quote)


@dataclass(frozen=True, slots=True)
class Quote:
    provider: str
    pair: str
    value: Decimal
    source_time: datetime
    bid: Decimal | None = None
    ask: Decimal | None = None
    proxied: bool = False


# An error's text is shown as is by /providers, the 503 details and the dashboard: bounded.
REASON_LIMIT = 100
MESSAGE_LIMIT = 200
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
# A tag (or a comment, a doctype), also one that a snippet cut short; a lone "<" is no markup.
_TAG = re.compile(r"<(?:[a-zA-Z/!?][^>]*)?(?:>|$)")
_SPACE = re.compile(r"\s+")


def readable(text: str, limit: int = REASON_LIMIT) -> str:
    """Plain words from an upstream's body or message: an HTML page's title (else its text) with
    no markup, entities decoded, whitespace collapsed, at most ``limit`` characters."""
    title = _TITLE.search(text)
    if title:
        text = title.group(1)
    # Entities are decoded after the tags go, then again stripped: "&lt;b&gt;" is markup too.
    plain = _TAG.sub(" ", html.unescape(_TAG.sub(" ", text)))
    plain = _SPACE.sub(" ", plain).strip()
    return plain if len(plain) <= limit else plain[: limit - 1].rstrip() + "…"


def summarise_error(status: int, url: httpx.URL | str, body: str = "", *, via: str = "") -> str:
    """One upstream HTTP failure in a line: ``HTTP 503 from api.binance.com: Service Unavailable``.

    The reason is the exchange's own message or the error page's title when there is one (a
    status number it repeats is dropped), else the standard phrase of the status; ``via`` names
    the kind of request when it is not a plain GET (``WebSocket upgrade``).
    """
    address = httpx.URL(str(url))
    host = address.host + (f":{address.port}" if address.port else "")
    reason = re.sub(rf"^{status}\b[\s:–-]*", "", readable(body))
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "error"
    return f"HTTP {status} from {host or 'the provider'}{f' ({via})' if via else ''}: {reason}"


@dataclass(frozen=True, slots=True)
class Listing:
    """Every market of one provider, from one market-wide answer: `quotes(pairs)` prices any
    pairs from it without asking the exchange again (a pair it does not list gets no quote)."""

    provider: str
    quotes: Callable[[Sequence[Pair]], list[Quote]]


class ProviderError(Exception):
    """Base of every provider failure; ``str()`` is a short human reason, never markup.

    Every failure passes here, whatever built its text (a body snippet, a close frame's reason):
    what the upstream said is shown as plain, bounded text.
    """

    def __init__(self, reason: object = "") -> None:
        super().__init__(readable(str(reason), MESSAGE_LIMIT))


class ProviderTimeout(ProviderError):
    pass


class ProviderConnectionError(ProviderError):
    """Connection refused or reset, DNS failure, or a WebSocket that closed under us."""


class ProviderHTTPError(ProviderError):
    def __init__(self, reason: str, *, status: int) -> None:
        super().__init__(reason)
        self.status = status


class ProviderRateLimited(ProviderHTTPError):
    def __init__(self, reason: str, *, status: int = 429, retry_after: float | None = None) -> None:
        super().__init__(reason, status=status)
        self.retry_after = retry_after


class ProviderMalformed(ProviderError):
    """The body or frame is not the documented shape (non-JSON, wrong keys, a torn frame)."""


def to_decimal(raw: object) -> Decimal:
    """An exact Decimal from an exchange's string or JSON number; anything else becomes NaN.

    NaN (rather than an exception) lets one bad price be rejected by validation, with a reason,
    without throwing away the other quotes of the same payload.
    """
    if isinstance(raw, bool):  # bool is an int subclass; True is not a price
        return NAN
    if isinstance(raw, Decimal):
        return raw
    if isinstance(raw, int | str):
        try:
            return Decimal(raw)
        except InvalidOperation:
            return NAN
    return NAN


def optional_decimal(raw: object) -> Decimal | None:
    """Like :func:`to_decimal` for optional fields (bid/ask): missing or empty stays None."""
    if raw is None or raw == "":
        return None
    return to_decimal(raw)


def from_millis(raw: object) -> datetime | None:
    if isinstance(raw, bool) or not isinstance(raw, int | str | Decimal):
        return None
    try:
        millis = int(raw)
        # Split seconds and milliseconds so no float rounding shifts the microseconds.
        return datetime.fromtimestamp(millis // 1000, tz=UTC) + timedelta(
            milliseconds=millis % 1000
        )
    except (ValueError, OverflowError, OSError):
        return None


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is seconds (what exchanges send) or an HTTP date (allowed by RFC 9110)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - utc_now()).total_seconds())


def decode_json(text: str | bytes, *, what: str) -> Any:
    """JSON with every number parsed as an exact Decimal (CoinGecko and CBR send JSON numbers)."""
    try:
        return json.loads(text, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        snippet = text[:40] if isinstance(text, str) else text[:40].decode("utf-8", "replace")
        raise ProviderMalformed(
            f"{what} is not JSON ({exc.__class__.__name__}: {snippet!r})"
        ) from exc


class Provider(ABC):
    name: ClassVar[str]
    supports_stream: ClassVar[bool] = False
    freshness: ClassVar[float | None] = None
    # Seconds after which stream() returns so the caller reconnects before the exchange cuts the
    # connection (Binance: 24 h). None: the exchange sets no lifetime.
    connection_lifetime: ClassVar[float | None] = None
    # What one `listing()` costs: its requests, and the request weight the exchange counts.
    listing_requests: ClassVar[int] = 1
    listing_weight: ClassVar[int] = 1

    def __init__(
        self,
        *,
        rest_url: str,
        ws_url: str | None = None,
        client: httpx.AsyncClient,
        aliases: Mapping[str, str] | None = None,
        usd_proxy: str = "USDT",
        max_connection_age: float | None = None,
    ) -> None:
        self.rest_url = rest_url.rstrip("/")
        self.ws_url = ws_url.rstrip("/") if ws_url else None
        self.client = client
        self.aliases = {k.upper(): v.upper() for k, v in (aliases or {}).items()}
        self.usd_proxy = usd_proxy.upper()
        self.max_connection_age = (
            max_connection_age if max_connection_age is not None else self.connection_lifetime
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.rest_url}>"

    def asset(self, code: str) -> str:
        """The provider-side asset for a Kurs asset code (USDTTRC/USDTERC → USDT)."""
        return self.aliases.get(code.upper(), code.upper())

    def market(self, pair: Pair, quote_assets: frozenset[str]) -> tuple[str, str, bool] | None:
        """(base, quote, proxied) of the crypto market serving ``pair`` on a USDT-quoted exchange.

        A USD pair is served by the ``usd_proxy`` market (BTC-USD ← BTCUSDT, proxied) because these
        exchanges have no USD order books; with no proxy it is unsupported. A pair whose two legs
        are the same asset after aliasing and proxying (USDT-USD, USDTTRC-USDT) is an identity, not
        a market, so it is unsupported too.
        """
        base, quote = self.asset(pair.base), self.asset(pair.quote)
        proxied = False
        if quote == "USD":
            if not self.usd_proxy:
                return None
            quote, proxied = self.usd_proxy, True
        if base == quote or base in FIAT_CODES or quote not in quote_assets:
            return None
        return base, quote, proxied

    @abstractmethod
    def supports(self, pair: Pair) -> bool:
        """Can this provider quote the pair directly (no cross rate)?"""

    @abstractmethod
    async def fetch(self, pairs: Sequence[Pair]) -> list[Quote]:
        """One REST round for the supported pairs among ``pairs``; unsupported ones are skipped."""

    async def listing(self) -> Listing:
        """Every market the provider quotes, in as few requests as it allows (on-demand pairs)."""
        raise ProviderError(f"{self.name} has no market-wide listing")

    def stream(self, pairs: Sequence[Pair]) -> AsyncGenerator[Quote, None]:
        """One WebSocket connection's life; streaming providers override this with a generator."""
        raise ProviderError(f"{self.name} has no WebSocket stream")

    def request_weight(self, path: str, params: Mapping[str, str] | None) -> int:
        """The weight the exchange counts for one request (its published cost)."""
        return 1

    def reported_weight(self, response: httpx.Response) -> int | None:
        """The weight used in the current window as the exchange reports it, if it does."""
        return None

    # --- REST plumbing ----------------------------------------------------------------------

    async def get_json(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Any, httpx.Response]:
        """GET ``rest_url + path`` and decode JSON; every failure becomes a ProviderError."""
        url = self.rest_url + path
        try:
            try:
                response = await self.client.get(url, params=params, headers=headers)
            except STALE_CONNECTION_ERRORS as exc:
                # A pooled keep-alive connection the server closed while it sat idle (exchanges
                # close idle ones, the emulator after 5 s: the poll interval) fails on reuse with
                # "Server disconnected without sending a response". A GET is safe to repeat, on a
                # fresh connection; only a second failure is the provider's error.
                logger.debug(
                    "%s: retrying %s once: %s",
                    self.name,
                    path,
                    str(exc) or type(exc).__name__,
                    extra={"provider": self.name},
                )
                response = await self.client.get(url, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(f"timed out ({type(exc).__name__}) on {path}") from exc
        except httpx.TransportError as exc:
            raise ProviderConnectionError(
                f"cannot reach {path}: {str(exc) or type(exc).__name__}"
            ) from exc
        # Every answered request counts against the exchange's limit, the fetcher's included.
        weights.record(
            self.name, self.request_weight(path, params), reported=self.reported_weight(response)
        )
        try:
            self.check_response(response)
        except ProviderRateLimited as exc:
            weights.hold(self.name, exc.retry_after)
            raise
        return decode_json(response.content, what=f"{path} body"), response

    def check_response(self, response: httpx.Response) -> None:
        """Raise for a non-2xx status; providers extend this with their own error bodies."""
        status = response.status_code
        if status < 400:
            return
        detail = self.error_detail(response)
        if status in (429, 418):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            wait = f", retry after {retry_after:g}s" if retry_after is not None else ""
            raise ProviderRateLimited(
                summarise_error(status, response.request.url, f"rate limited{wait}{detail}"),
                status=status,
                retry_after=retry_after,
            )
        raise ProviderHTTPError(
            summarise_error(status, response.request.url, detail.removeprefix(": ")), status=status
        )

    def error_detail(self, response: httpx.Response) -> str:
        """A short suffix describing an error body (exchanges override for their JSON errors)."""
        text = readable(response.text)
        return f": {text}" if text else ""

    # --- WebSocket plumbing -----------------------------------------------------------------

    async def ws_messages(
        self,
        url: str,
        *,
        subscribe: Sequence[str] = (),
        heartbeat: tuple[float, Callable[[], str]] | None = None,
    ) -> AsyncGenerator[str | bytes, None]:
        """Raw messages of one WebSocket connection, until it closes or its lifetime is over.

        Protocol-level pings from the server are answered by websockets itself (it replies with a
        pong echoing the payload, as Binance requires); ``ping_interval`` also makes us ping the
        server so a silently dead connection is noticed within ~40 s. ``heartbeat`` adds an
        application-level ping (Bybit's ``{"op": "ping"}``) every so many seconds.
        """
        loop = asyncio.get_running_loop()
        try:
            connection = await connect(
                url, open_timeout=10, ping_interval=20, ping_timeout=20, close_timeout=2
            )
        except InvalidStatus as exc:
            raise self.handshake_error(exc) from exc
        except TimeoutError as exc:
            raise ProviderTimeout(f"WebSocket handshake timed out ({url})") from exc
        except (OSError, WebSocketException) as exc:
            raise ProviderConnectionError(
                f"cannot open WebSocket: {str(exc) or type(exc).__name__}"
            ) from exc
        heartbeat_task: asyncio.Task[None] | None = None
        try:
            for request in subscribe:
                await connection.send(request)
            if heartbeat is not None:
                heartbeat_task = asyncio.create_task(self._heartbeat(connection, *heartbeat))
            deadline = (
                None if self.max_connection_age is None else loop.time() + self.max_connection_age
            )
            while True:
                timeout = None if deadline is None else deadline - loop.time()
                if timeout is not None and timeout <= 0:
                    logger.info(
                        "%s: connection lifetime reached, reconnecting",
                        self.name,
                        extra={"provider": self.name},
                    )
                    return
                try:
                    async with asyncio.timeout(timeout):
                        message = await connection.recv()
                except TimeoutError:
                    continue  # the deadline check above ends the connection
                yield message
        except ConnectionClosed as exc:
            raise ProviderConnectionError(f"stream closed: {describe_close(exc)}") from exc
        finally:
            if heartbeat_task is not None:
                heartbeat_task.cancel()
                with suppress(asyncio.CancelledError):
                    await heartbeat_task
            await connection.close()

    @staticmethod
    async def _heartbeat(
        connection: ClientConnection, interval: float, message: Callable[[], str]
    ) -> None:
        # A failed send means the connection is gone; recv() in the main loop reports why.
        with suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                await connection.send(message())

    def handshake_error(self, exc: InvalidStatus) -> ProviderError:
        """Map an HTTP answer to the WebSocket upgrade request (e.g. 429, 503) to an error."""
        response = exc.response
        status = response.status_code
        body = readable((response.body or b"").decode("utf-8", "replace"))
        url = self.ws_url or self.rest_url
        if status in (429, 418):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            limited = f"rate limited: {body}" if body else "rate limited"
            return ProviderRateLimited(
                summarise_error(status, url, limited, via="WebSocket upgrade"),
                status=status,
                retry_after=retry_after,
            )
        return ProviderHTTPError(
            summarise_error(status, url, body, via="WebSocket upgrade"), status=status
        )


def describe_close(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "connection lost without a close frame"
    reason = f" {frame.reason}" if frame.reason else ""
    return f"code {frame.code}{reason}"
