"""What the API, the django-q2 tasks and `run_fetch` call to have rates fetched.

`request_cycle` asks the live owner (over `kurs.ctl.fetch`); `fetch_once` runs one cycle here as
the safety net, only while nobody owns live state; `fetch_read_only` quotes without writing;
`fetch_rates` is the safety net's task. `provider_statuses` is what `/providers` answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from contextlib import suppress
from decimal import Decimal
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings

from rates import servedlog, services
from rates.fetcher import (
    MAX_ROUND_SECONDS,
    CycleReport,
    Fetcher,
    control_subject,
    http_client,
    no_writes,
)
from rates.lease import RENEW_EVERY, Lease
from rates.provider_health import provider_statuses
from rates.providers import build_providers
from realtime import nats

# The fetching process logs under one name, whichever of its modules speaks.
logger = logging.getLogger("rates.fetcher")

__all__ = ["fetch_once", "fetch_rates", "fetch_read_only", "provider_statuses", "request_cycle"]

# POST /tasks/run waits this long for the owner before running the safety net itself.
CONTROL_TIMEOUT = 2.0


async def fetch_once(*, provider_names: Sequence[str] | None = None) -> CycleReport | None:
    """One REST cycle now, as the safety net: only when no live owner holds the lease.

    Takes the lease for the cycle (starting from the stored current rates) and gives it back.
    Returns None, having fetched nothing, while another process owns live state.
    """
    lease = Lease()
    if not await sync_to_async(lease.try_acquire)():
        return None
    board = services.get_board()
    board.guard = lease.held
    keeper = asyncio.create_task(_keep(lease))
    try:
        await sync_to_async(services.board_load)()
        nats.relay_undelivered()  # what a dead owner committed and never sent, first
        servedlog.follow_acks()
        return await _cycle_here(provider_names)
    finally:
        keeper.cancel()
        with suppress(asyncio.CancelledError):
            await keeper
        board.guard = no_writes
        await sync_to_async(lease.release)()


async def _keep(lease: Lease) -> None:
    """Renew the safety net's lease while its cycle runs, as the owner renews its own: a cycle
    can outlast the lease (a round may take MAX_ROUND_SECONDS), and a lease that lapsed
    mid-cycle would silently drop the writes after it. A lost renewal ends the writes."""
    while True:
        await asyncio.sleep(RENEW_EVERY)  # the renewal's cadence
        if not await sync_to_async(lease.try_acquire, thread_sensitive=False)():
            return


async def fetch_read_only(*, provider_names: Sequence[str] | None = None) -> CycleReport:
    """A cycle that quotes but never writes or publishes (`run_fetch` while another owns)."""
    board = services.get_board()
    board.guard = no_writes
    await sync_to_async(services.board_load)()
    return await _cycle_here(provider_names)


async def _cycle_here(provider_names: Sequence[str] | None) -> CycleReport:
    """One cycle in this process, with its own HTTP client; the board's guard decides writes."""
    names = list(provider_names or settings.KURS_PROVIDERS)
    poll = settings.KURS_POLL_INTERVAL
    async with http_client(min(MAX_ROUND_SECONDS, poll)) as client:
        return await Fetcher(build_providers(names, client=client), poll_interval=poll).cycle()


def fetch_rates() -> dict[str, Any]:
    """The django-q2 safety net: `fetch_once`, or nothing while a live owner runs."""
    report = async_to_sync(fetch_once)()
    if report is None:
        logger.info("safety net: a live owner holds the lease; nothing to do")
        return {"skipped": "a live owner holds the lease"}
    return report.event()


async def request_cycle() -> dict[str, Any] | None:
    """Ask the live owner for a cycle; its report, or None when no owner answered in time."""
    reply = await nats.request(control_subject(), b"{}", within=CONTROL_TIMEOUT)
    if reply is None:
        return None
    try:
        report = json.loads(reply, parse_float=Decimal)
    except ValueError:
        logger.warning("the owner's answer on %s is not JSON", control_subject())
        return None
    return report if isinstance(report, dict) else None
