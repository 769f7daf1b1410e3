"""`GET /api/v1/health`: each component checked for real, with a short timeout.

A router of the API that no app owns: it probes the whole deployment (database, cache, channel
layer, NATS, the providers' owner, freshness, the pegs), as `/metrics` (`edge.metrics`) measures
it; both count against the edge's operations budget (`edge.security`).

`down` (503) when the database cannot be used: nothing can be served or stored. Any other
failing component makes the service `degraded` (200): it still answers, from what it has.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import cache
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpRequest
from django.utils import timezone
from ninja import Router
from ninja.responses import Status

from rates import exclusions
from rates.lease import lease_holder
from rates.peg_monitor import peg_statuses
from rates.provider_health import provider_statuses
from rates.schemas import ErrorOut
from rates.selectors import current_rates_freshness
from realtime import nats

router = Router(tags=["health"])

CHECK_TIMEOUT = 2.0

Check = dict[str, Any]


def _ping_database() -> None:
    try:
        _select_one()
    except (OperationalError, InterfaceError):
        # This worker's connection ended (a restart, an administrator), not necessarily the
        # database: asked once more on a new connection before saying `down`.
        connection.close()
        _select_one()


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def check_database() -> Check:
    await sync_to_async(_ping_database)()
    return {"status": "ok", "vendor": connection.vendor}


async def check_cache() -> Check:
    key, token = f"health:{uuid.uuid4().hex}", uuid.uuid4().hex
    await cache.aset(key, token, 10)
    if await cache.aget(key) != token:
        return {"status": "degraded", "detail": "the cache did not return what was stored"}
    await cache.adelete(key)
    return {"status": "ok", "backend": settings.CACHES["default"]["BACKEND"].rsplit(".", 1)[-1]}


async def check_channel_layer() -> Check:
    layer = get_channel_layer()
    if layer is None:
        return {"status": "degraded", "detail": "no channel layer configured"}
    channel = await layer.new_channel()
    token = uuid.uuid4().hex
    await layer.send(channel, {"type": "health.probe", "token": token})
    message = await layer.receive(channel)
    if message.get("token") != token:
        return {"status": "degraded", "detail": "the channel layer returned another message"}
    return {"status": "ok", "backend": type(layer).__name__}


async def check_nats() -> Check:
    # Idempotent: a web process under daphne has no lifespan, so the first check may start it.
    nats.connection.start()
    await asyncio.to_thread(nats.connection.connected.wait, 1.0)
    return nats.status()


def _owner() -> dict[str, Any] | None:
    holder = lease_holder()
    if holder is None:
        return None
    return {"holder": holder.holder, "epoch": holder.epoch, "expires_at": holder.expires_at}


def _long_excluded(statuses: list[dict[str, Any]]) -> str | None:
    """Who a consensus has left out for longer than `exclusions.DEGRADED_AFTER`, and of which
    pairs (docs/rates.md#consensus-pricing); None when nobody."""
    now = timezone.now()
    named = [
        f"{status['name']} ({', '.join(excluded['pairs'])})"
        for status in statuses
        if (excluded := status["excluded"])
        and exclusions.overdue(datetime.fromisoformat(excluded["since"]), now=now)
    ]
    if not named:
        return None
    minutes = exclusions.DEGRADED_AFTER.total_seconds() / 60
    return f"excluded by consensus for over {minutes:g} min: {'; '.join(named)}"


async def check_providers() -> Check:
    """The owner's breakers, who the owner is (None: no live fetcher holds the lease), and any
    provider a consensus has left out for long."""
    statuses = await sync_to_async(provider_statuses)()
    owner = await sync_to_async(_owner)()
    states = {status["name"]: status["state"] for status in statuses}
    usable = [name for name, state in states.items() if state != "open"]
    excluded = _long_excluded(statuses)
    if not usable:
        return {
            "status": "degraded",
            "detail": "every provider's circuit is open",
            "states": states,
            "owner": owner,
        }
    status = "ok" if len(usable) == len(states) and excluded is None else "degraded"
    check: Check = {"status": status, "states": states, "owner": owner}
    if excluded is not None:
        check["detail"] = excluded
    return check


def _freshness() -> Check:
    report = current_rates_freshness(now=timezone.now())
    if report["quoted"] == 0:
        return {
            "status": "degraded",
            "detail": f"no current rate yet for {report['active']} active pairs",
            **report,
        }
    return {"status": "ok" if not report["stale"] else "degraded", **report}


async def check_freshness() -> Check:
    return await sync_to_async(_freshness)()


async def check_pegs() -> Check:
    """`degraded` while a peg of KURS_PEGS is broken: pairs priced through it are converted
    and marked `depeg` (docs/rates.md#pegs). An unknown peg (no evidence yet) is not a fault."""
    statuses = await sync_to_async(peg_statuses)()
    states = {f"{peg['asset']}-{peg['reference']}": peg["state"] for peg in statuses}
    broken = sorted(pair for pair, state in states.items() if state == "broken")
    if broken:
        return {"status": "degraded", "detail": f"broken: {', '.join(broken)}", "states": states}
    return {"status": "ok", "states": states}


CHECKS: dict[str, Callable[[], Awaitable[Check]]] = {
    "database": check_database,
    "cache": check_cache,
    "channel_layer": check_channel_layer,
    "nats": check_nats,
    "providers": check_providers,
    "freshness": check_freshness,
    "pegs": check_pegs,
}


async def _run(name: str, check: Callable[[], Awaitable[Check]]) -> Check:
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except TimeoutError:
        result = {"status": "down", "detail": f"no answer within {CHECK_TIMEOUT:g} s"}
    except Exception as exc:  # a health check reports failures, it does not raise them
        result = {"status": "down", "detail": f"{type(exc).__name__}: {exc}"}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return result


async def health_report() -> dict[str, Any]:
    results = await asyncio.gather(*(_run(name, check) for name, check in CHECKS.items()))
    components = dict(zip(CHECKS, results, strict=True))
    if components["database"]["status"] != "ok":
        overall = "down"
    elif all(component["status"] == "ok" for component in components.values()):
        overall = "ok"
    else:
        overall = "degraded"
    return {"status": overall, "components": components}


@router.get("", response={200: dict, 503: dict, 429: ErrorOut})
async def health(request: HttpRequest) -> Status[dict[str, Any]]:
    report = await health_report()
    return Status(503 if report["status"] == "down" else 200, report)
