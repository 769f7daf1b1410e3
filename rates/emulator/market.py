"""The emulator's state: one price book per provider, fault switches, and a request log.

Prices random-walk from realistic levels; every change (walk or control call) is pushed to the
subscribed stream connections through per-connection queues, so a price set by hand is never
coalesced away before it reaches the socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

PROVIDERS = ("binance", "bybit", "coingecko", "cbr")
MODES = (
    "ok",
    "slow",
    "down",
    "rate_limited",
    "garbage",
    "absurd",
    "skew",
    "drop_stream",
    "stale",
)
GARBAGE_VARIANTS = ("text", "shape")

# Crypto markets shared by Binance and Bybit: symbol → (start price, decimals).
EXCHANGE_MARKETS: Mapping[str, tuple[str, int]] = {
    "BTCUSDT": ("90000.00", 2),
    "ETHUSDT": ("3000.00", 2),
    "SOLUSDT": ("140.00", 2),
    "BNBUSDT": ("600.0", 1),
    "USDCUSDT": ("1.0001", 4),
    "ETHBTC": ("0.03333", 5),
    "BTCEUR": ("83000.00", 2),
}
# CoinGecko "<coin id>.<vs currency>" → (start price, decimals); RUB via USD/RUB ≈ 80.
COINGECKO_PRICES: Mapping[str, tuple[str, int]] = {
    "bitcoin.usd": ("90012.3456789", 7),
    "bitcoin.rub": ("7200987.654321", 6),
    "bitcoin.eur": ("83010.123456", 6),
    "ethereum.usd": ("3001.23456789", 8),
    "ethereum.rub": ("240098.7654321", 7),
    "ethereum.eur": ("2768.1234567", 7),
    "tether.usd": ("1.000312", 6),
    "tether.rub": ("80.0249616", 7),
    "tether.eur": ("0.9226", 4),
    "usd-coin.usd": ("0.999912", 6),
    "usd-coin.rub": ("79.992960", 6),
    "solana.usd": ("140.123456", 6),
    "solana.rub": ("11209.876543", 6),
}
# CBR daily table: code → (Value for Nominal units, Nominal, Name). JPY, KZT and AMD are per 100.
CBR_TABLE: Mapping[str, tuple[str, int, str]] = {
    "USD": ("80.0000", 1, "Доллар США"),
    "EUR": ("93.1234", 1, "Евро"),
    "GBP": ("106.5021", 1, "Фунт стерлингов"),
    "CNY": ("11.0523", 1, "Юань"),
    "AUD": ("52.3107", 1, "Австралийский доллар"),
    "CAD": ("57.4012", 1, "Канадский доллар"),
    "CHF": ("100.2045", 1, "Швейцарский франк"),
    "JPY": ("52.8010", 100, "Японских иен"),
    "KZT": ("15.6789", 100, "Казахстанских тенге"),
    "AMD": ("20.6512", 100, "Армянских драмов"),
}
CBR_IDS: Mapping[str, tuple[str, str]] = {
    "USD": ("R01235", "840"),
    "EUR": ("R01239", "978"),
    "GBP": ("R01035", "826"),
    "CNY": ("R01375", "156"),
    "AUD": ("R01010", "036"),
    "CAD": ("R01350", "124"),
    "CHF": ("R01775", "756"),
    "JPY": ("R01820", "392"),
    "KZT": ("R01335", "398"),
    "AMD": ("R01060", "051"),
}
# Relative standard deviation of one random-walk step of an asset's market (BTC, ETH, ...): one
# step per asset and tick, shared by every book that lists it, as arbitrage keeps real exchanges
# together. Each book adds its own noise around it, which does not accumulate (a basis point), so
# two providers' prices of one coin stay a few basis points apart however long the walk runs.
VOLATILITY = 0.0005
BOOK_NOISE = 0.0001
# Assets that do not walk (fiat and the stablecoins, at their pegs).
STEADY_ASSETS = frozenset({"USD", "USDT", "USDC", "EUR", "RUB"})
COINGECKO_ASSETS: Mapping[str, str] = {
    "bitcoin": "BTC",
    "ethereum": "ETH",
    "tether": "USDT",
    "usd-coin": "USDC",
    "solana": "SOL",
}
EXCHANGE_QUOTES = ("USDT", "BTC", "EUR")
# The `depeg` scenario: the books quoted in USDT on the exchanges, and the CoinGecko ids of USDT.
USDT_QUOTED = "USDT"
TETHER_PREFIX = "tether."
# Bounds of the USDT price a depeg may set, and of a `skew` in percent: a fault stays plausible.
DEPEG_RANGE = (Decimal("0.01"), Decimal(100))
SKEW_LIMIT = Decimal(50)
# `synthetic_pairs`: N made-up coins SYN0001..SYNnnnn listed on every crypto provider (a scale
# benchmark's load): USDT books on the exchanges, `usd` on CoinGecko (CBR lists fiat only).
SYNTHETIC_PREFIX = "SYN"
SYNTHETIC_LIMIT = 9999
# Synthetic listings are drawn from their own seeded generator: the same N coins at the same
# start prices in every run, whatever the walk's seed.
SYNTHETIC_SEED = 20


def synthetic_listing(count: int) -> dict[str, tuple[str, int]]:
    """``{"SYN0001": (start price, decimals), ...}``: plausible prices from 0.01 to 10,000 (log-
    uniform), each to about six significant digits, as an exchange's tick size would print it."""
    if not 0 <= count <= SYNTHETIC_LIMIT:
        raise ValueError(f"synthetic pairs: expected 0 to {SYNTHETIC_LIMIT}, got {count}")
    rng = random.Random(SYNTHETIC_SEED)
    listing = {}
    for number in range(1, count + 1):
        price = Decimal(str(10 ** rng.uniform(-2, 4)))
        decimals = max(0, 5 - price.adjusted())
        listing[f"{SYNTHETIC_PREFIX}{number:04d}"] = (
            str(price.quantize(Decimal(1).scaleb(-decimals))),
            decimals,
        )
    return listing


def _scaled(prices: Mapping[str, tuple[str, int]], factor: Decimal) -> dict[str, tuple[str, int]]:
    return {
        symbol: (str((Decimal(price) * factor).quantize(Decimal(1).scaleb(-decimals))), decimals)
        for symbol, (price, decimals) in prices.items()
    }


def symbol_assets(symbol: str) -> tuple[str, str]:
    """(base, quote) assets of a book symbol: ``BTCUSDT``, ``bitcoin.usd``, CBR's ``USD`` (RUB)."""
    coin, dot, vs = symbol.partition(".")
    if dot:
        return COINGECKO_ASSETS.get(coin, coin.upper()), vs.upper()
    for quote in EXCHANGE_QUOTES:
        if symbol.endswith(quote) and symbol != quote:
            return symbol.removesuffix(quote), quote
    return symbol, "RUB"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class PriceChange:
    symbol: str
    price: Decimal
    time_ms: int


@dataclass(slots=True)
class Fault:
    """One provider's switch. ``delay``/``retry_after``/``status``/``factor``/``variant`` tune
    the mode that uses them and are ignored by the others."""

    mode: str = "ok"
    delay: float = 3.0
    retry_after: float | None = 2.0
    status: int | None = None
    factor: Decimal = Decimal(1000)
    # `skew`: every price off by this many percent (well-formed, plausible, steady).
    percent: Decimal = Decimal(2)
    variant: str = "text"
    # `stale`: when the provider froze (ms); its REST answers carry this time, its streams
    # stay open but silent, and its prices stop moving.
    frozen_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "delay": self.delay,
            "retry_after": self.retry_after,
            "status": self.status,
            "factor": str(self.factor),
            "percent": str(self.percent),
            "variant": self.variant,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Validate a control request body; raises ValueError naming the bad field."""
        known = {"mode", "delay", "retry_after", "status", "factor", "percent", "variant"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        fault = cls()
        mode = data.get("mode", "ok")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        fault.mode = mode
        if "delay" in data:
            fault.delay = _non_negative(data["delay"], "delay")
        if "retry_after" in data:
            raw = data["retry_after"]
            fault.retry_after = None if raw is None else _non_negative(raw, "retry_after")
        if "status" in data:
            status = data["status"]
            if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
                raise ValueError(f"status: expected an HTTP error status, got {status!r}")
            fault.status = status
        if "factor" in data:
            fault.factor = _decimal(data["factor"], "factor")
        if "percent" in data:
            fault.percent = _decimal(data["percent"], "percent")
            if abs(fault.percent) > SKEW_LIMIT:
                raise ValueError(
                    f"percent: expected -{SKEW_LIMIT} to {SKEW_LIMIT}, got {data['percent']!r}"
                )
        if "variant" in data:
            if data["variant"] not in GARBAGE_VARIANTS:
                raise ValueError(f"variant: expected one of {', '.join(GARBAGE_VARIANTS)}")
            fault.variant = data["variant"]
        return fault

    @property
    def price_factor(self) -> Decimal:
        """What every price this provider serves is multiplied by (`absurd`, `skew`)."""
        if self.mode == "absurd":
            return self.factor
        if self.mode == "skew":
            return 1 + self.percent / 100
        return Decimal(1)


def _decimal(raw: object, name: str) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str | Decimal):
        raise ValueError(f"{name}: expected a number, got {raw!r}")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise ValueError(f"{name}: expected a number, got {raw!r}") from None
    if not value.is_finite():
        raise ValueError(f"{name}: expected a finite number, got {raw!r}")
    return value


def parse_depeg(raw: object) -> Decimal:
    """The USD price of USDT for the `depeg` scenario; raises ValueError naming the bound."""
    price = _decimal(raw, "price")
    low, high = DEPEG_RANGE
    if not low <= price <= high:
        raise ValueError(f"price: expected a USD price of USDT from {low} to {high}, got {raw!r}")
    return price


def _non_negative(raw: object, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"{name}: expected seconds, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: expected seconds, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{name}: expected seconds >= 0, got {raw!r}")
    return value


def parse_fault_flag(flag: str) -> tuple[str, Fault]:
    """``binance=down``, ``bybit=slow:delay=2``, ``coingecko=rate_limited:retry_after=5``."""
    provider, sep, spec = flag.partition("=")
    provider = provider.strip().lower()
    if not sep or provider not in (*PROVIDERS, "all"):
        raise ValueError(f"expected PROVIDER=MODE[:key=value...], got {flag!r}")
    mode, *options = spec.split(":")
    data: dict[str, Any] = {"mode": mode.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"option {option!r} in {flag!r}: expected key=value")
        data[key.strip()] = int(value) if key.strip() == "status" else value
    return provider, Fault.from_json(data)


class Book:
    """One provider's prices and change times, plus its live stream subscribers."""

    def __init__(self, prices: Mapping[str, tuple[str, int]], *, walks: bool = True) -> None:
        stamp = now_ms()
        self.decimals = {symbol: decimals for symbol, (_, decimals) in prices.items()}
        self.prices = {symbol: Decimal(price) for symbol, (price, _) in prices.items()}
        self.changed_ms = dict.fromkeys(prices, stamp)
        self.walks = walks
        self.assets = {symbol: symbol_assets(symbol) for symbol in prices}
        # Each symbol's own noise around its assets' common walk (see BOOK_NOISE).
        self.noise = dict.fromkeys(prices, 0.0)
        # None in a queue is a wake-up: the connection re-reads its fault switch.
        self.subscribers: set[asyncio.Queue[PriceChange | None]] = set()

    def set(self, symbol: str, price: Decimal) -> PriceChange:
        change = PriceChange(symbol, price, now_ms())
        self.prices[symbol] = price
        self.changed_ms[symbol] = change.time_ms
        for queue in self.subscribers:
            # A connection that stops reading must not grow without bound: it loses its backlog.
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(change)
        return change

    def rounded(self, symbol: str, price: Decimal) -> Decimal:
        """``price`` to the symbol's tick size (how the exchange would print it)."""
        return price.quantize(Decimal(1).scaleb(-self.decimals[symbol]))

    def walk(
        self, rng: random.Random, steps: Mapping[str, float], part: int = 0, parts: int = 1
    ) -> None:
        """One tick: each symbol follows its assets' common ``steps`` and redraws its noise;
        with ``parts``, only the symbols of slice ``part`` (every ``parts``-th one)."""
        if not self.walks:
            return
        for index, (symbol, price) in enumerate(list(self.prices.items())):
            if index % parts != part:
                continue
            base, quote = self.assets[symbol]
            noise = rng.gauss(0, BOOK_NOISE)
            move = (1 + steps.get(base, 0.0)) / (1 + steps.get(quote, 0.0))
            factor = move * (1 + noise) / (1 + self.noise[symbol])
            self.noise[symbol] = noise
            moved = self.rounded(symbol, price * Decimal(str(factor)))
            if moved > 0:
                self.set(symbol, moved)

    def wake(self) -> None:
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    def subscribe(self) -> asyncio.Queue[PriceChange | None]:
        # Room for a few ticks of every symbol (a thousand synthetic pairs move at once).
        size = max(1000, 4 * len(self.prices))
        queue: asyncio.Queue[PriceChange | None] = asyncio.Queue(maxsize=size)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[PriceChange | None]) -> None:
        self.subscribers.discard(queue)


# How many slices a tick's moves are spread over (Market.slices).
WALK_SLICES = 10


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    provider: str
    method: str
    path: str
    query: str
    time_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "time_ms": self.time_ms,
        }


@dataclass
class Market:
    """Everything the emulator knows; one instance per emulator server."""

    tick: float = 1.0
    seed: int | None = None
    synthetic_pairs: int = 0
    # A tick's moves are spread over it in this many slices, each moving every `slices`-th
    # symbol of each book, as an exchange's stream spreads its updates over time. 1: every
    # symbol at the same instant (with a thousand pairs, two thousand quotes in one burst each
    # second: a worst case, not what an exchange sends).
    slices: int = WALK_SLICES
    books: dict[str, Book] = field(init=False)
    faults: dict[str, Fault] = field(init=False)
    requests: deque[LoggedRequest] = field(init=False)
    # Every provider request since the last clear, by provider: the log above keeps only the
    # last 1,000, and a test or benchmark that bounds Kurs's upstream traffic counts them all.
    request_counts: Counter[str] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        synthetic = synthetic_listing(self.synthetic_pairs)
        exchange = {
            **EXCHANGE_MARKETS,
            **{f"{coin}USDT": start for coin, start in synthetic.items()},
        }
        coingecko = {
            **COINGECKO_PRICES,
            **{f"{coin.lower()}.usd": (p, d + 2) for coin, (p, d) in synthetic.items()},
        }
        self.books = {
            "binance": Book(exchange),
            # Bybit's book starts a hair above Binance's so failover is visible in the data.
            "bybit": Book(_scaled(exchange, Decimal("1.0002"))),
            "coingecko": Book(coingecko),
            # Official daily rates do not move within the day; only control calls change them.
            "cbr": Book(
                {code: (value, 4) for code, (value, _, _) in CBR_TABLE.items()}, walks=False
            ),
        }
        self.faults = {provider: Fault() for provider in PROVIDERS}
        self.requests = deque(maxlen=1000)
        self.request_counts = Counter()
        self.started_ms = now_ms()
        # The `depeg` scenario: what one USDT is worth in USD on every exchange and on CoinGecko.
        self.usdt_usd = Decimal(1)
        # Binance's request weight in the current clock minute: (minute, weight used).
        self._binance_weight = (0, 0)

    def set_fault(self, provider: str, fault: Fault) -> None:
        targets = PROVIDERS if provider == "all" else (provider,)
        for name in targets:
            frozen = now_ms() if fault.mode == "stale" else None
            self.faults[name] = dataclasses.replace(fault, frozen_ms=frozen)
            # Stream connections re-read their switch at once (drop_stream closes them).
            self.books[name].wake()

    def set_depeg(self, usdt_usd: Decimal) -> None:
        """USDT trades at ``usdt_usd`` dollars everywhere: every USDT-quoted exchange price scales
        by 1/price (a coin costs more USDT), CoinGecko's tether prices by price, and its true USD
        prices (bitcoin.usd) stay. ``1`` restores the peg. The change is pushed on the streams."""
        ratio = self.usdt_usd / usdt_usd
        self.usdt_usd = usdt_usd
        for name, book in self.books.items():
            for symbol, price in list(book.prices.items()):
                if name in ("binance", "bybit") and symbol.endswith(USDT_QUOTED):
                    book.set(symbol, book.rounded(symbol, price * ratio))
                elif name == "coingecko" and symbol.startswith(TETHER_PREFIX):
                    book.set(symbol, book.rounded(symbol, price / ratio))

    def log_request(self, provider: str, method: str, path: str, query: str) -> None:
        self.requests.append(LoggedRequest(provider, method, path, query, now_ms()))
        self.request_counts[provider] += 1

    def clear_requests(self) -> None:
        self.requests.clear()
        self.request_counts.clear()

    def spend_binance_weight(self, weight: int) -> int:
        """Add a request's weight to the current minute's; the total, as X-MBX-USED-WEIGHT-1M."""
        minute = now_ms() // 60_000
        current, used = self._binance_weight
        used = used + weight if current == minute else weight
        self._binance_weight = (minute, used)
        return used

    async def run_walk(self) -> None:
        """Every `tick`, each book's symbols move once, slice after slice (`slices`)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            steps: Mapping[str, float] = {}
            for part in range(self.slices):
                due += self.tick / self.slices
                await asyncio.sleep(max(0.0, due - loop.time()))
                if part == 0:
                    steps = self.steps()
                self.walk(steps, part, self.slices)

    def steps(self) -> dict[str, float]:
        """One tick's common move of every asset (its pairs follow it, with their own noise)."""
        assets = {
            asset for book in self.books.values() for pair in book.assets.values() for asset in pair
        }
        return {
            asset: self.rng.gauss(0, VOLATILITY)
            for asset in sorted(assets)
            if asset not in STEADY_ASSETS
        }

    def walk(self, steps: Mapping[str, float] | None = None, part: int = 0, parts: int = 1) -> None:
        """One tick of every book (a stale provider's prices stand still); with `parts`, of the
        symbols of slice `part` only."""
        if steps is None:
            steps = self.steps()
        for name, book in self.books.items():
            if self.faults[name].mode != "stale":
                book.walk(self.rng, steps, part, parts)
