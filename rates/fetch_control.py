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
from functools import partial
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings

from rates import servedlog, services, shards
from rates.fetcher import (
    MAX_ROUND_SECONDS,
    CycleReport,
    Fetcher,
    control_subject,
    http_client,
    no_writes,
)
from rates.lease import RENEW_EVERY
from rates.provider_health import provider_statuses
from rates.providers import build_providers
from realtime import nats, outbox_rows

# The fetching process logs under one name, whichever of its modules speaks.
logger = logging.getLogger("rates.fetcher")

__all__ = ["fetch_once", "fetch_rates", "fetch_read_only", "provider_statuses", "request_cycle"]

# POST /tasks/run waits this long for the owner before running the safety net itself.
CONTROL_TIMEOUT = 2.0


async def fetch_once(*, provider_names: Sequence[str] | None = None) -> CycleReport | None:
    """One REST cycle now, as the safety net: only when no live owner holds the lease.

    Takes the lease for the cycle (starting from the stored current rates) and gives it back.
    Returns None, having fetched nothing, while another process owns live state. With shards,
    it takes every shard nobody owns and cycles for their pairs alone.
    """
    held = shards.Shards()
    owned = await sync_to_async(held.take)(greedy=True)
    if not owned:
        return None
    board = services.get_board()
    shards.own(board, held, owned)
    board.guard = lambda: held.held(owned)
    keeper = asyncio.create_task(_keep(held, owned))
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
        shards.disown(board)
        await sync_to_async(held.release)(owned)


async def _keep(held: shards.Shards, owned: frozenset[int]) -> None:
    """Renew the safety net's leases while its cycle runs, as the owner renews its own: a cycle
    can outlast a lease (a round may take MAX_ROUND_SECONDS), and a lease that lapsed
    mid-cycle would silently drop the writes after it. A lost renewal ends the writes."""
    # Off the sync thread (a renewal must not queue behind the cycle's writes), in a pool thread
    # of this cycle's loop: each run of the safety net has a loop of its own (async_to_sync), whose
    # threads end with it, so each renewal closes its connection, or every run would leave a
    # PostgreSQL session behind until the garbage collector found it.
    renew = sync_to_async(outbox_rows.in_worker_thread, thread_sensitive=False)
    while True:
        await asyncio.sleep(RENEW_EVERY)  # the renewal's cadence
        if not await renew(partial(held.renew, owned)):
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
    """Ask the live owner for a cycle; its report, or None when no owner answered in time.

    With shards, every shard's owner is asked at once and their answers merged
    (`merge_reports`): the report of the owners that answered; None when none did."""
    count = shards.shard_count()
    if count == 1:
        return await _ask(control_subject())
    answers = await asyncio.gather(*(_ask(control_subject(shard)) for shard in range(count)))
    return merge_reports([answer for answer in answers if answer is not None])


async def _ask(subject: str) -> dict[str, Any] | None:
    reply = await nats.request(subject, b"{}", within=CONTROL_TIMEOUT)
    if reply is None:
        return None
    try:
        report = json.loads(reply, parse_float=Decimal)
    except ValueError:
        logger.warning("the owner's answer on %s is not JSON", subject)
        return None
    return report if isinstance(report, dict) else None


def merge_reports(answers: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Shard owners' answers as one report: each owner counted once (one that holds several
    shards answers for each), `stored` summed, the longest `duration_ms`, and each provider
    `ok` only if it was ok for every owner (else the first error)."""
    by_owner = {answer.get("owner"): answer for answer in answers}
    if not by_owner:
        return None
    providers: dict[str, str] = {}
    for answer in by_owner.values():
        for name, status in (answer.get("providers") or {}).items():
            if providers.get(name, "ok") == "ok":
                providers[name] = status
    return {
        "stored": sum(int(answer.get("stored") or 0) for answer in by_owner.values()),
        "providers": providers,
        "duration_ms": max(int(answer.get("duration_ms") or 0) for answer in by_owner.values()),
    }
