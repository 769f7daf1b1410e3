"""Per-socket delivery policy and the resume hand-over, in the hub, without sockets.

Frames here are labels; the policy judges the (value, provider, status) facts passed with them.
The policy's intervals and heartbeats are measured on the loop's clock: the tests that depend on
them run on a `VirtualClockLoop`, where no time passes while the test is busy, however slow the
machine, and waiting jumps straight to the next timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from realtime.hub import DeliveryPolicy, SocketQueue
from realtime.nats.stream import stream_epoch
from realtime.options import BadOption, delivery_policy, parse_epoch
from realtime.tests.test_hub import FakeSocket, queue_for
from realtime.tests.virtual_clock import on_virtual_clock

LIVE = ("binance", "live")


def policy(
    *, interval_ms: int = 0, change: str = "0", heartbeat_s: float = 3600.0
) -> DeliveryPolicy:
    return DeliveryPolicy(
        min_interval_s=interval_ms / 1000, min_change=Decimal(change), heartbeat_s=heartbeat_s
    )


async def put_rate(
    queue: SocketQueue, frame: str, value: str, provider: str = "binance", status: str = "live"
) -> None:
    """Offer one update, then let the sender task run: what passed is sent before the next one
    (nothing coalesces in the queue, so each drop is the policy's)."""
    assert queue.put(frame, "BTC-USD", None, (Decimal(value), provider, status))
    for _ in range(3):
        await asyncio.sleep(0)


@on_virtual_clock
async def test_it_sends_at_most_one_update_per_interval_and_the_latest_one_after_it() -> None:
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None, policy=policy(interval_ms=150))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(1, 11):
        await put_rate(queue, f"v{n}", str(100 + n))
    assert socket.frames == ["v1"]
    await socket.wait_for(2)
    # The pending one went when the interval ended, and it is the latest of the nine.
    assert socket.frames == ["v1", "v10"]
    assert loop.time() - started == pytest.approx(0.15)
    # A status change passes at once, inside the interval, and replaces nothing pending.
    await put_rate(queue, "v11", "111")
    await put_rate(queue, "failover", "111", provider="coingecko", status="failover")
    await socket.wait_for(3)
    assert socket.frames == ["v1", "v10", "failover"]
    await queue.stop()
    assert queue.policy is not None
    assert not queue.policy.timers


async def test_it_sends_only_moves_of_at_least_the_fraction_and_status_or_provider_changes() -> (
    None
):
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None, policy=policy(change="0.01"))
    steps = [
        ("first", "100", "binance", "live"),  # a pair's first update always goes
        ("small", "100.5", "binance", "live"),  # 0.5 %: dropped
        ("back", "99.2", "binance", "live"),  # 0.8 % from 100: dropped
        ("moved", "101", "binance", "live"),  # 1 % from the last delivered (100): goes
        ("tiny", "101.1", "binance", "live"),  # dropped
        ("provider", "101.1", "coingecko", "live"),  # provider changed: goes
        ("status", "101.1", "coingecko", "stale"),  # status changed: goes
        ("down", "99.9", "coingecko", "stale"),  # -1.19 %: goes
        ("same", "99.9", "coingecko", "stale"),  # dropped
    ]
    for frame, value, provider, status in steps:
        await put_rate(queue, frame, value, provider, status)
    await put_rate(queue, "marker", "1", "marker", "live")
    await socket.wait_for(6)
    assert socket.frames == ["first", "moved", "provider", "status", "down", "marker"]
    await queue.stop()


@on_virtual_clock
async def test_it_lets_a_small_move_through_when_a_heartbeat_is_due() -> None:
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None, policy=policy(change="0.5", heartbeat_s=0.1))
    await put_rate(queue, "first", "100")
    await asyncio.sleep(0.05)  # inside the heartbeat period
    await put_rate(queue, "dropped", "100.1")
    await socket.wait_for(1)
    await asyncio.sleep(0.06)  # the period is over
    await put_rate(queue, "heartbeat", "100.1")
    await socket.wait_for(2)
    assert socket.frames == ["first", "heartbeat"]
    await queue.stop()


@on_virtual_clock
async def test_a_newer_small_move_cancels_a_pending_update_within_the_fraction() -> None:
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None, policy=policy(interval_ms=100, change="0.01"))
    await put_rate(queue, "first", "100")
    await asyncio.sleep(0.01)
    assert queue.put("eth-first", "ETH-USD", None, (Decimal(10), *LIVE))  # 10 ms after "first"
    await put_rate(queue, "big", "110")  # pending until the interval ends
    assert queue.put("eth-big", "ETH-USD", None, (Decimal(20), *LIVE))  # pending, ends later
    await put_rate(queue, "back", "100.2")  # the client's 100 is within 1 % again: nothing to send
    # ETH-USD's interval ends after BTC-USD's: had "big" still been pending, it would come first.
    await socket.wait_for(3)
    assert socket.frames == ["first", "eth-first", "eth-big"]
    await queue.stop()


async def test_rates_without_a_policy_and_other_events_are_untouched() -> None:
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None, policy=policy(interval_ms=10_000))
    await put_rate(queue, "r1", "1")
    await put_rate(queue, "r2", "2")  # held for 10 s
    assert queue.put("item.updated")  # not a rate: no policy
    assert queue.put("r-other", "ETH-USD", None, (Decimal(5), *LIVE))  # another pair: its first
    await socket.wait_for(3)
    assert socket.frames == ["r1", "item.updated", "r-other"]
    plain = FakeSocket()
    unpoliced = queue_for(plain, pairs=None)
    assert unpoliced.policy is None
    for n in range(3):
        assert unpoliced.put(f"p{n}", None)
    await plain.wait_for(3)
    await queue.stop()
    await unpoliced.stop()


def test_options_build_a_policy_only_when_asked() -> None:
    assert delivery_policy(None, None) is None
    assert delivery_policy("", "") is None
    assert delivery_policy(0, 0) is None
    built = delivery_policy("250", "0.002")
    assert built is not None
    assert (built.min_interval_s, built.min_change) == (0.25, Decimal("0.002"))


async def test_the_hand_over_from_replay_to_live_has_no_duplicate_and_no_gap() -> None:
    socket = FakeSocket()
    replaying = asyncio.Event()
    go_on = asyncio.Event()

    async def replay() -> AsyncIterator[tuple[str | None, int | None]]:
        for seq in (3, 4):
            yield f"e{seq}", seq
        replaying.set()
        await go_on.wait()  # live events arrive meanwhile
        for seq in (5, 6):
            yield f"e{seq}", seq
        yield None, 7  # the read covered the stream up to 7 (7 did not concern this socket)

    queue = SocketQueue(socket.send, socket.close, pairs=None, prelude=replay())
    queue.start()
    await replaying.wait()
    for seq in (5, 6, 7, 8, 9):  # the hub's live events: 5 and 6 are also in the replay
        # Rate updates of one pair: held for the hand-over, they must not coalesce on release.
        assert queue.put(f"e{seq}", "BTC-USD", seq)
    assert queue.put("tick")  # not an event: no seq, released in its place
    go_on.set()
    await socket.wait_for(7)
    assert socket.frames == ["e3", "e4", "e5", "e6", "e8", "e9", "tick"]
    await queue.stop()


async def test_a_socket_that_holds_too_much_during_a_replay_is_closed() -> None:
    socket = FakeSocket()
    go_on = asyncio.Event()

    async def replay() -> AsyncIterator[tuple[str | None, int | None]]:
        await go_on.wait()
        yield None, 0

    queue = SocketQueue(socket.send, socket.close, pairs=None, queue_limit=2, prelude=replay())
    queue.start()
    results = [queue.put(f"e{n}", None, n) for n in range(40)]
    assert results.count(False) == 40 - 32  # HELD_LIMIT_FACTOR x the queue limit were held
    async with asyncio.timeout(2):
        await socket.closed.wait()
    go_on.set()
    await queue.stop()


def test_an_epoch_is_what_the_stream_says_and_nothing_else() -> None:
    """`epoch=` takes every epoch `stream_epoch` makes (streams a microsecond apart differ; the
    far future still fits) and refuses anything else."""
    made = datetime(2026, 12, 7, 9, 50, 1, 123456, tzinfo=UTC)
    again = made.replace(microsecond=123457)
    far = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    epochs = [stream_epoch(when) for when in (made, again, far)]
    assert epochs[0] != epochs[1]
    assert [parse_epoch(epoch) for epoch in epochs] == epochs
    assert stream_epoch(None) is None
    assert parse_epoch("") is None
    for bad in ("Hourn6occg", "a b", "a" * 17, 42, "é"):
        with pytest.raises(BadOption):
            parse_epoch(bad)
