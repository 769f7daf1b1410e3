"""CoinGecko v3 ``/api/v3/simple/price``: aggregated prices, including true USD and RUB.

Formats and traps: shared/reference/provider-formats.md section 4. Prices are JSON numbers (not
strings), parsed here straight into Decimal so no binary float ever touches them. Unknown ids are
silently left out of the answer, so a missing coin is "no quote", not an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx

from rates.providers.base import (
    Listing,
    Pair,
    Provider,
    ProviderHTTPError,
    ProviderMalformed,
    Quote,
    to_decimal,
    utc_now,
)

# Kurs asset code (after aliases, so USDTTRC/USDTERC arrive here as USDT) → CoinGecko coin id.
COIN_IDS: Mapping[str, str] = {
    "BTC": "bitcoin",
    "ETH": "ethereum",
    "USDT": "tether",
    "USDC": "usd-coin",
    "BNB": "binancecoin",
    "SOL": "solana",
    "TON": "the-open-network",
    "TRX": "tron",
    "LTC": "litecoin",
    "XRP": "ripple",
    "DOGE": "dogecoin",
}
# A subset of /simple/supported_vs_currencies: the quotes Kurs users ask for. USDT is not one.
VS_CURRENCIES = frozenset(
    [
        "usd",
        "eur",
        "rub",
        "gbp",
        "jpy",
        "cny",
        "aud",
        "cad",
        "chf",
        "try",
        "uah",
        "inr",
        "brl",
        "pln",
        "sek",
        "nok",
        "czk",
        "aed",
        "hkd",
        "sgd",
        "krw",
        "btc",
        "eth",
    ]
)

Wanted = dict[tuple[str, str], list[Pair]]


class CoinGeckoProvider(Provider):
    name: ClassVar[str] = "coingecko"
    supports_stream: ClassVar[bool] = False
    # CoinGecko caches /simple/price for 60 s on the public API: a quote younger than the general
    # KURS_STALE_AFTER (30 s) would be rare, so it gets a window that matches its own cache.
    freshness: ClassVar[float | None] = 120.0

    def __init__(self, *, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key or None

    def coin_and_vs(self, pair: Pair) -> tuple[str, str] | None:
        coin = COIN_IDS.get(self.asset(pair.base))
        vs = self.asset(pair.quote).lower()
        if coin is None or vs not in VS_CURRENCIES:
            return None
        return coin, vs

    def supports(self, pair: Pair) -> bool:
        return self.coin_and_vs(pair) is not None

    def headers(self) -> dict[str, str]:
        """The key header: pro keys only work on the pro host and demo keys only elsewhere."""
        if not self.api_key:
            return {}
        if "pro-api.coingecko.com" in self.rest_url:
            return {"x-cg-pro-api-key": self.api_key}
        return {"x-cg-demo-api-key": self.api_key}

    def wanted(self, pairs: Sequence[Pair]) -> Wanted:
        wanted: Wanted = defaultdict(list)
        for pair in pairs:
            key = self.coin_and_vs(pair)
            if key is not None:
                wanted[key].append(pair)
        return dict(wanted)

    async def fetch(self, pairs: Sequence[Pair]) -> list[Quote]:
        wanted = self.wanted(pairs)
        if not wanted:
            return []
        body = await self._simple_price({coin for coin, _ in wanted}, {vs for _, vs in wanted})
        return parse_simple_price(body, wanted, utc_now())

    async def listing(self) -> Listing:
        # Every coin Kurs maps in every currency it asks for: one call (the keyless API allows
        # about 30 a minute), however many pairs it then prices.
        body = await self._simple_price(set(COIN_IDS.values()), set(VS_CURRENCIES))
        received = utc_now()
        parse_simple_price(body, {}, received)  # an error body raises here

        def quotes(pairs: Sequence[Pair]) -> list[Quote]:
            return parse_simple_price(body, self.wanted(pairs), received)

        return Listing(self.name, quotes)

    async def _simple_price(self, coins: set[str], currencies: set[str]) -> Any:
        params = {
            "ids": ",".join(sorted(coins)),
            "vs_currencies": ",".join(sorted(currencies)),
            "include_last_updated_at": "true",
            "precision": "full",
        }
        body, _ = await self.get_json("/api/v3/simple/price", params=params, headers=self.headers())
        return body

    def error_detail(self, response: httpx.Response) -> str:
        # CoinGecko errors are {"status": {"error_code": 429, "error_message": "..."}}.
        try:
            status = response.json().get("status")
        except (ValueError, AttributeError):
            return super().error_detail(response)
        if isinstance(status, dict) and "error_message" in status:
            return f": {status.get('error_code')} {str(status['error_message'])[:80]}"
        return super().error_detail(response)


def parse_simple_price(body: Any, wanted: Wanted, received: datetime) -> list[Quote]:
    """Quotes from ``{coin: {vs: number, "last_updated_at": unix seconds}}``.

    ``last_updated_at`` is per coin; without it (it is opt-in) the arrival time stands in.
    """
    if not isinstance(body, dict):
        raise ProviderMalformed(f"simple/price body is not an object: {body!r:.80}")
    status = body.get("status")
    if isinstance(status, dict) and "error_code" in status:
        raise ProviderHTTPError(
            f"error {status['error_code']}: {status.get('error_message', '')}"[:120],
            status=int(status["error_code"]) if isinstance(status["error_code"], int) else 200,
        )
    quotes: list[Quote] = []
    for (coin, vs), pairs in wanted.items():
        prices = body.get(coin)
        if prices is None:
            continue  # CoinGecko leaves unknown ids out
        if not isinstance(prices, dict):
            raise ProviderMalformed(f"simple/price entry for {coin} is not an object")
        if vs not in prices:
            continue
        updated = prices.get("last_updated_at")
        when = (
            datetime.fromtimestamp(int(updated), tz=UTC)
            if isinstance(updated, int) and not isinstance(updated, bool)
            else received
        )
        quotes.extend(
            Quote(
                provider=CoinGeckoProvider.name,
                pair=pair.code,
                value=to_decimal(prices[vs]),
                source_time=when,
            )
            for pair in pairs
        )
    return quotes
