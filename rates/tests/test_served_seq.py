"""A served version's `seq` (docs/api.md#point-in-time), end to end against a real JetStream."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from items.models import Item
from rates import servedlog, services
from rates.models import ServedRate
from rates.tests.support import fresh_board, make_quote, rate_settings
from realtime import nats as realtime_nats
from realtime.tests.conftest import own_jetstream, prefix, realtime_isolated
from realtime.tests.test_outbox import Acks, acks
from tests.services import NatsServer

# Fixtures used by name.
__all__ = ["acks", "fresh_board", "own_jetstream", "prefix", "rate_settings", "realtime_isolated"]

pytestmark = [pytest.mark.nats, pytest.mark.django_db(transaction=True)]


@pytest.mark.usefixtures("rate_settings", "fresh_board")
async def test_a_served_version_gets_the_seq_of_the_event_that_announced_it(
    own_jetstream: NatsServer, acks: Acks
) -> None:
    """The owner's path end to end: the quote's version is logged with its event's id in the
    write's transaction, and the JetStream ack gives it the `seq` clients saw
    (docs/api.md#point-in-time)."""
    assert await asyncio.to_thread(realtime_nats.wait_connected, 15)
    servedlog.follow_acks()

    def serve() -> ServedRate:
        Item.objects.get_or_create(base="BTC", quote="USD")
        services.accept_quote(make_quote("binance", "BTC-USD", "100"))
        return ServedRate.objects.get()

    try:
        row = await sync_to_async(serve)()
        assert row.event_id is not None
        seq = (await asyncio.to_thread(acks.wait_for, [row.event_id]))[row.event_id]
        assert await asyncio.to_thread(servedlog.seq_recorder.wait_idle, 60)
        await sync_to_async(row.refresh_from_db)()
        assert (row.version, row.seq) == (1, seq)
    finally:
        realtime_nats.outbox.remove_ack_callback(servedlog.seq_recorder.ack)
