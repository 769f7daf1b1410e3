from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TypedDict, Unpack

import httpx
import pytest

from rates.breaker import CircuitBreaker
from rates.emulator import EmulatorServer
from rates.providers import Pair, Provider, ProviderRateLimited, Quote
from rates.providers.base import REASON_LIMIT
from rates.providers.streaming import (
    CONNECTING,
    DISCONNECTED,
    STOPPED,
    STREAMING,
    backoff_delay,
    stream_forever,
)
from rates.tests.conftest_emulator import make_provider

WAIT = 3.0


class Backoff(TypedDict, total=False):
    backoff_base: float
    backoff_cap: float


FAST: Backoff = {"backoff_base": 0.01, "backoff_cap": 0.05}


class Recorder:
    """Collects quotes and states, with events a test can wait on."""

    def __init__(self) -> None:
        self.quotes: asyncio.Queue[Quote] = asyncio.Queue()
        self.states: list[tuple[str, str]] = []
        self.seen: dict[str, asyncio.Event] = {}

    async def on_quote(self, quote: Quote) -> None:
        await self.quotes.put(quote)

    def on_state(self, state: str, reason: str) -> None:
        self.states.append((state, reason))
        self.event(state).set()

    def event(self, state: str) -> asyncio.Event:
        return self.seen.setdefault(state, asyncio.Event())

    def stream(
        self, provider: Provider, pair: Pair, stop: asyncio.Event, **options: Unpack[Backoff]
    ) -> asyncio.Task[None]:
        """`stream_forever` for one pair in a task, reporting to this recorder."""
        return asyncio.create_task(
            stream_forever(
                provider, [pair], self.on_quote, stop=stop, on_state=self.on_state, **options
            )
        )

    async def quote_where(self, value: Decimal) -> Quote:
        async def scan() -> Quote:
            while True:
                quote = await self.quotes.get()
                if quote.value == value:
                    return quote

        return await asyncio.wait_for(scan(), WAIT)


@pytest.mark.parametrize("name", ["binance", "bybit"])
async def test_it_reconnects_after_a_drop_and_resumes_when_cleared(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient, name: str
) -> None:
    provider = make_provider(name, emulator, emulator_client)
    symbol = "BTCUSDT"
    recorder, stop = Recorder(), asyncio.Event()
    task = recorder.stream(provider, Pair("BTC", "USD"), stop, **FAST)
    await asyncio.wait_for(recorder.event(STREAMING).wait(), WAIT)
    emulator.set_fault(name, "drop_stream")
    await asyncio.wait_for(recorder.event(DISCONNECTED).wait(), WAIT)
    assert any("1011" in reason for state, reason in recorder.states if state == DISCONNECTED)
    emulator.set_fault(name, "ok")
    emulator.market.books[name].set(symbol, Decimal("95000.5"))
    quote = await recorder.quote_where(Decimal("95000.5"))
    assert quote.pair == "BTC-USD"
    assert quote.proxied
    stop.set()
    await asyncio.wait_for(task, WAIT)
    assert recorder.states[0] == (CONNECTING, "")
    assert recorder.states[-1] == (STOPPED, "")


async def test_it_keeps_trying_while_the_exchange_refuses(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("binance", emulator, emulator_client)
    emulator.set_fault("binance", "down")
    recorder, stop = Recorder(), asyncio.Event()
    task = recorder.stream(provider, Pair("ETH", "USDT"), stop, **FAST)
    await asyncio.wait_for(recorder.event(DISCONNECTED).wait(), WAIT)
    assert "503" in recorder.states[-1][1]
    emulator.set_fault("binance", "ok")
    await asyncio.wait_for(recorder.quotes.get(), WAIT)
    stop.set()
    await asyncio.wait_for(task, WAIT)


async def test_a_crash_is_reported_as_bounded_plain_text(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (not a ProviderError) ends a connection: its reason, which `/providers` shows, has
    no markup and a bounded length, however long and marked-up the exception's text."""
    provider = make_provider("binance", emulator, emulator_client)

    async def crashing(pairs: object) -> AsyncIterator[Quote]:
        before_the_crash: list[Quote] = []  # none, but an async generator, as `stream` is
        for quote in before_the_crash:
            yield quote
        raise RuntimeError("<html><body><b>bad</b> " + "x" * 5000 + "</body></html>")

    monkeypatch.setattr(provider, "stream", crashing)
    recorder, stop = Recorder(), asyncio.Event()
    task = recorder.stream(provider, Pair("BTC", "USD"), stop, **FAST)
    await asyncio.wait_for(recorder.event(DISCONNECTED).wait(), WAIT)
    stop.set()
    await asyncio.wait_for(task, WAIT)
    reason = next(reason for state, reason in recorder.states if state == DISCONNECTED)
    assert reason.startswith("RuntimeError: bad xxx")
    assert len(reason) <= REASON_LIMIT
    assert "<" not in reason


async def test_it_returns_promptly_when_stopped_mid_backoff(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("bybit", emulator, emulator_client)
    emulator.set_fault("bybit", "down")
    recorder, stop = Recorder(), asyncio.Event()
    task = recorder.stream(provider, Pair("ETH", "USDT"), stop, backoff_base=60)
    await asyncio.wait_for(recorder.event(DISCONNECTED).wait(), WAIT)
    stop.set()
    await asyncio.wait_for(task, 1)  # a 30-60 s back-off must not delay the stop
    assert recorder.states[-1][0] == STOPPED


async def test_a_failing_consumer_does_not_tear_the_stream(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("binance", emulator, emulator_client)
    recorder, stop = Recorder(), asyncio.Event()
    calls = 0

    async def flaky(quote: Quote) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("consumer bug")
        await recorder.on_quote(quote)

    task = asyncio.create_task(
        stream_forever(
            provider, [Pair("BTC", "USDT")], flaky, stop=stop, on_state=recorder.on_state, **FAST
        )
    )
    await asyncio.wait_for(recorder.event(STREAMING).wait(), WAIT)
    emulator.market.books["binance"].set("BTCUSDT", Decimal("90100"))
    await recorder.quote_where(Decimal("90100"))
    stop.set()
    await asyncio.wait_for(task, WAIT)
    assert DISCONNECTED not in {state for state, _ in recorder.states}


async def test_it_stops_at_once_with_nothing_to_stream(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    recorder = Recorder()
    provider = make_provider("cbr", emulator, emulator_client)
    await asyncio.wait_for(
        stream_forever(
            provider,
            [Pair("USD", "RUB")],
            recorder.on_quote,
            stop=asyncio.Event(),
            on_state=recorder.on_state,
        ),
        WAIT,
    )
    assert recorder.states == [(STOPPED, "nothing to stream")]


async def test_it_can_be_cancelled(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = make_provider("binance", emulator, emulator_client)
    recorder = Recorder()
    task = recorder.stream(provider, Pair("BTC", "USDT"), asyncio.Event())
    await asyncio.wait_for(recorder.event(STREAMING).wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    for attempt in range(12):
        step = min(30.0, 1.0 * 2**attempt)
        delay = backoff_delay(attempt, base=1.0, cap=30.0)
        assert step / 2 <= delay <= step
    assert len({backoff_delay(5, base=1.0, cap=30.0) for _ in range(20)}) > 1


async def test_a_rate_limited_handshake_goes_through_the_breaker_and_honours_retry_after(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    """429 + Retry-After: 2 on the upgrade: the breaker opens for 2 s, and the stream does not
    knock again before then, although its own back-off (10 ms) would."""
    provider = make_provider("binance", emulator, emulator_client)
    emulator.set_fault("binance", "rate_limited", retry_after=2)
    emulator.market.requests.clear()
    breaker = CircuitBreaker("binance", backoff=0.1)
    limits: list[float | None] = []

    def on_rate_limited(exc: ProviderRateLimited) -> None:
        limits.append(exc.retry_after)
        breaker.record_failure(str(exc), retry_after=exc.retry_after)

    recorder, stop = Recorder(), asyncio.Event()
    task = asyncio.create_task(
        stream_forever(
            provider,
            [Pair("BTC", "USD")],
            recorder.on_quote,
            stop=stop,
            on_state=recorder.on_state,
            gate=breaker.retry_in,
            on_rate_limited=on_rate_limited,
            **FAST,
        )
    )
    await asyncio.wait_for(recorder.event(DISCONNECTED).wait(), WAIT)
    assert limits == [2.0]
    assert breaker.state == "open"
    emulator.set_fault("binance", "ok")
    await asyncio.wait_for(recorder.event(STREAMING).wait(), WAIT)
    opens = [r.time_ms for r in emulator.market.requests if r.method == "WS"]
    assert len(opens) == 2  # the refused one, and one after Retry-After: none in between
    assert opens[1] - opens[0] >= 1900
    stop.set()
    await asyncio.wait_for(task, WAIT)
