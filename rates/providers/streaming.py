"""Keep one provider's WebSocket stream alive: reconnect with jittered exponential back-off.

The back-off is a dozen lines, so it lives here rather than adding a retry library: the loop
also has to race every wait against ``stop`` and reset after a healthy connection, which a
decorator-shaped retry API does not express any more simply.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing, suppress

from rates.providers.base import (
    REASON_LIMIT,
    Pair,
    Provider,
    ProviderError,
    ProviderRateLimited,
    Quote,
    readable,
)

logger = logging.getLogger(__name__)

# States reported through ``on_state(state, reason)``.
CONNECTING = "connecting"
STREAMING = "streaming"
DISCONNECTED = "disconnected"
STOPPED = "stopped"


def crash_reason(exc: BaseException) -> str:
    """An unexpected exception (a bug, not a ProviderError) as a provider's error, which
    `/providers` and the dashboard show: its type and message as bounded plain text."""
    name = type(exc).__name__
    return f"{name}: {readable(str(exc), max(REASON_LIMIT - len(name) - 2, 20))}"


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Equal-jitter exponential back-off: half the step fixed, half random.

    The random half spreads reconnects of many processes after an exchange outage; the fixed half
    keeps a single process from hammering a server that refuses it.
    """
    step = min(cap, base * 2.0**attempt)
    return step / 2 + random.uniform(0, step / 2)


async def stream_forever(
    provider: Provider,
    pairs: Sequence[Pair],
    on_quote: Callable[[Quote], Awaitable[None]],
    *,
    stop: asyncio.Event,
    on_state: Callable[[str, str], None] | None = None,
    backoff_base: float = 1.0,
    backoff_cap: float = 30.0,
    healthy_after: float = 60.0,
    gate: Callable[[], float] | None = None,
    on_rate_limited: Callable[[ProviderRateLimited], None] | None = None,
) -> None:
    """Run ``provider.stream(pairs)`` until ``stop`` is set, reconnecting after every drop.

    ``on_state(state, reason)`` hears ``connecting``, ``streaming`` (first quote of a
    connection), ``disconnected`` (with the reason) and ``stopped``. A connection that lasted
    ``healthy_after`` seconds resets the back-off; a planned end (connection lifetime, server
    shutdown notice) reconnects at once. Never raises, except ``CancelledError``.

    ``gate()`` says how many seconds to hold off before connecting (the provider's breaker while
    it is open), and a 429/418 on the handshake goes to ``on_rate_limited`` (the breaker, which
    honours its ``Retry-After``) before the next attempt waits for the gate.
    """
    loop = asyncio.get_running_loop()
    # Drops since a connection last delivered a quote: the first is a WARNING, the rest DEBUG
    # (a provider unreachable for an hour reconnects every half minute), and the first quote
    # after them an INFO.
    failing = 0

    def report(state: str, reason: str = "") -> None:
        if on_state is None:
            return
        try:
            on_state(state, reason)
        except Exception:
            logger.exception(
                "%s: on_state callback failed", provider.name, extra={"provider": provider.name}
            )

    async def one_connection() -> None:
        nonlocal failing
        report(CONNECTING)
        async with aclosing(provider.stream(pairs)) as quotes:
            first = True
            async for quote in quotes:
                if first:
                    report(STREAMING)
                    first = False
                    if failing:
                        logger.info(
                            "%s: stream delivers again (after %d failed connections)",
                            provider.name,
                            failing,
                            extra={"provider": provider.name},
                        )
                    failing = 0
                try:
                    await on_quote(quote)
                except Exception:
                    # A bug in the consumer must not tear down the connection of every pair.
                    logger.exception(
                        "%s: on_quote failed for %s",
                        provider.name,
                        quote.pair,
                        extra={"provider": provider.name, "pair": quote.pair},
                    )

    if (
        not provider.supports_stream
        or provider.ws_url is None
        or not any(provider.supports(pair) for pair in pairs)
    ):
        report(STOPPED, "nothing to stream")
        return
    stop_wait = asyncio.create_task(stop.wait())
    connection: asyncio.Task[None] | None = None
    attempt = 0
    try:
        hold = gate() if gate is not None else 0.0
        if hold > 0:
            logger.info("%s: stream waits %.1fs for the provider's breaker", provider.name, hold)
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stop_wait), hold)
        while not stop.is_set():
            started = loop.time()
            connection = asyncio.create_task(one_connection())
            await asyncio.wait({connection, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not connection.done():
                break  # stopped; the finally clause closes the connection
            healthy = loop.time() - started >= healthy_after
            error = connection.exception()
            if healthy:
                attempt = 0
            if error is None:
                reason = "connection ended by plan (lifetime or server shutdown)"
                if healthy:
                    report(DISCONNECTED, reason)
                    logger.info(
                        "%s: %s, reconnecting",
                        provider.name,
                        reason,
                        extra={"provider": provider.name},
                    )
                    continue
            elif isinstance(error, ProviderError):
                reason = str(error)
                if isinstance(error, ProviderRateLimited) and on_rate_limited is not None:
                    on_rate_limited(error)
            else:
                reason = crash_reason(error)
                logger.error(
                    "%s: stream crashed",
                    provider.name,
                    exc_info=error,
                    extra={"provider": provider.name},
                )
            delay = backoff_delay(attempt, base=backoff_base, cap=backoff_cap)
            if gate is not None:
                delay = max(delay, gate())
            attempt += 1
            failing += 1
            report(DISCONNECTED, reason)
            logger.log(
                logging.WARNING if failing == 1 else logging.DEBUG,
                "%s: stream dropped (%s); reconnecting in %.2fs%s",
                provider.name,
                reason,
                delay,
                " (logged again when it delivers; drops until then at DEBUG)"
                if failing == 1
                else "",
                extra={"provider": provider.name},
            )
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stop_wait), delay)
    finally:
        for task in (connection, stop_wait):
            if task is not None and not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
    report(STOPPED)
