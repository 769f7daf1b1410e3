"""Small helpers shared by the provider tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from rates.providers import Quote

WAIT = 3.0


async def next_quote(
    quotes: AsyncIterator[Quote], predicate: Callable[[Quote], bool] = lambda q: True
) -> Quote:
    """The next quote matching ``predicate``, failing the test after a few seconds."""

    async def scan() -> Quote:
        async for quote in quotes:
            if predicate(quote):
                return quote
        raise AssertionError("stream ended before the expected quote")

    return await asyncio.wait_for(scan(), WAIT)
