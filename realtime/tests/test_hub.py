"""The hub's fan-out, per-pair coalescing and slow-client disconnects, without sockets."""

from __future__ import annotations

import asyncio
from typing import Required, TypedDict, Unpack

from realtime.hub import CLOSE_TRY_AGAIN_LATER, DeliveryPolicy, Hub, SocketQueue


class FakeSocket:
    """Records frames; while `gate` is clear, a send blocks like a client that stopped reading."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.closed_with: int | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.got = asyncio.Event()
        self.closed = asyncio.Event()

    async def send(self, frame: str) -> None:
        await self.gate.wait()
        self.frames.append(frame)
        self.got.set()

    async def close(self, code: int) -> None:
        self.closed_with = code
        self.closed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(2):
            while len(self.frames) < count:
                self.got.clear()
                await self.got.wait()


class QueueOptions(TypedDict, total=False):
    pairs: Required[set[str] | None]
    queue_limit: int
    send_timeout: float
    policy: DeliveryPolicy


def queue_for(socket: FakeSocket, **kwargs: Unpack[QueueOptions]) -> SocketQueue:
    queue = SocketQueue(socket.send, socket.close, **kwargs)
    queue.start()
    return queue


async def test_pending_rate_updates_coalesce_per_pair_latest_wins() -> None:
    socket = FakeSocket()
    socket.gate.clear()
    queue = queue_for(socket, pairs=None)
    queue.put("A1", "A")
    await asyncio.sleep(0)  # the sender takes A1 and blocks in send
    for frame, pair in [("A2", "A"), ("A3", "A"), ("B1", "B"), ("E1", None), ("A4", "A")]:
        assert queue.put(frame, pair)
    assert queue.coalesced == 2
    socket.gate.set()
    await socket.wait_for(4)
    # A's latest value takes its own place: frames leave in the order they came (their seqs
    # never go backwards, so a client's last seq is a safe resume point).
    assert socket.frames == ["A1", "B1", "E1", "A4"]
    await queue.stop()


async def test_a_burst_to_a_client_that_keeps_up_is_sent_whole() -> None:
    # Several updates of one pair within one turn of the loop, before the sender ran: the
    # client is not behind, so none is dropped.
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None)
    for frame in ("A1", "A2", "B1", "A3"):
        assert queue.put(frame, frame[0])
    await socket.wait_for(4)
    assert socket.frames == ["A1", "A2", "B1", "A3"]
    assert queue.coalesced == 0
    await queue.stop()


async def test_a_backlog_of_a_quarter_of_the_queue_counts_as_behind() -> None:
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None, queue_limit=8)  # behind from 2 frames waiting
    # Put within one turn, before the writes: A2 finds E1 and A1 waiting (behind), supersedes
    # A1; A3 supersedes A2 likewise.
    for frame, pair in [("E1", None), ("A1", "A"), ("A2", "A"), ("B1", "B"), ("A3", "A")]:
        assert queue.put(frame, pair)
    await socket.wait_for(3)
    assert socket.frames == ["E1", "B1", "A3"]
    assert queue.coalesced == 2
    await queue.stop()


async def test_a_full_queue_closes_the_socket_with_1013() -> None:
    socket = FakeSocket()
    socket.gate.clear()
    queue = queue_for(socket, pairs=None, queue_limit=3)
    queue.put("E0")
    await asyncio.sleep(0)  # the sender takes E0 and blocks in send
    results = [queue.put(f"E{i}") for i in range(1, 5)]
    # E1-E3 fill the queue, E4 does not fit.
    assert results == [True, True, True, False]
    async with asyncio.timeout(2):
        await socket.closed.wait()
    assert socket.closed_with == CLOSE_TRY_AGAIN_LATER
    assert queue.kicked
    assert queue.put("later") is False
    await queue.stop()


async def test_a_send_blocked_too_long_closes_the_socket_on_the_next_event() -> None:
    socket = FakeSocket()
    socket.gate.clear()
    queue = queue_for(socket, pairs=None, send_timeout=0.05)
    queue.put("E0")
    await asyncio.sleep(0.1)
    assert queue.put("E1") is False
    async with asyncio.timeout(2):
        await socket.closed.wait()
    assert socket.closed_with == CLOSE_TRY_AGAIN_LATER
    await queue.stop()


async def test_a_slow_socket_does_not_delay_the_others() -> None:
    hub = Hub()
    slow, fast = FakeSocket(), FakeSocket()
    slow.gate.clear()
    slow_queue = queue_for(slow, pairs=None, queue_limit=10)
    fast_queue = queue_for(fast, pairs=None, queue_limit=10)
    hub.add(slow_queue)
    hub.add(fast_queue)
    for i in range(50):
        hub.publish(f"E{i}")
        await asyncio.sleep(0)  # let the fast sender keep up, as a real loop would
    await fast.wait_for(50)
    assert fast.frames == [f"E{i}" for i in range(50)]
    async with asyncio.timeout(2):
        await slow.closed.wait()
    assert len(hub) == 1  # the slow one was dropped from the hub
    await slow_queue.stop()
    await fast_queue.stop()


async def test_rates_go_to_their_pair_and_to_wildcard_sockets_only() -> None:
    hub = Hub()
    btc, eth, everything = FakeSocket(), FakeSocket(), FakeSocket()
    queues = [
        queue_for(btc, pairs={"BTC-USD"}),
        queue_for(eth, pairs={"ETH-USD"}),
        queue_for(everything, pairs=None),
    ]
    for queue in queues:
        hub.add(queue)
    assert hub.publish_rate("BTC-USD", "btc") == 2
    await everything.wait_for(1)
    hub.set_pairs(queues[1], {"ETH-USD", "BTC-USD"})
    assert hub.publish_rate("BTC-USD", "btc2") == 3
    await everything.wait_for(2)
    hub.remove(queues[0])
    assert hub.publish_rate("BTC-USD", "btc3") == 2
    await everything.wait_for(3)
    await eth.wait_for(2)
    assert everything.frames == ["btc", "btc2", "btc3"]
    assert btc.frames == ["btc", "btc2"]
    assert eth.frames == ["btc2", "btc3"]
    for queue in queues:
        await queue.stop()


async def test_sockets_that_keep_up_are_written_to_by_one_callback_at_the_end_of_the_turn() -> None:
    # No task wakes per socket and event: the frames go at the next turn of the loop, before
    # anything scheduled after them.
    sockets = [FakeSocket() for _ in range(3)]
    queues = [queue_for(socket, pairs=None) for socket in sockets]
    hub = Hub()
    for queue in queues:
        hub.add(queue)
    hub.publish("E1")
    hub.publish_rate("A", "A1")
    assert all(socket.frames == [] for socket in sockets)
    after = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(after.set_result, None)
    await after
    assert all(socket.frames == ["E1", "A1"] for socket in sockets)
    for queue in queues:
        await queue.stop()


async def test_a_send_that_waits_is_finished_by_a_task_then_the_socket_is_written_at_once() -> None:
    socket = FakeSocket()
    socket.gate.clear()
    queue = queue_for(socket, pairs=None)
    assert queue.put("E1")  # blocks in send: a task takes over
    assert queue.put("E2")
    await asyncio.sleep(0)
    assert socket.frames == []
    socket.gate.set()
    await socket.wait_for(2)
    assert socket.frames == ["E1", "E2"]
    await asyncio.sleep(0)  # the task ends with the queue empty
    assert queue.put("E3")
    await asyncio.sleep(0)
    assert socket.frames == ["E1", "E2", "E3"]  # at the turn's end again, by no task
    assert queue.sent == 3
    await queue.stop()


async def test_a_send_that_fails_after_waiting_marks_the_socket_gone() -> None:
    failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sent: list[str] = []
    finished = asyncio.Event()

    async def send(frame: str) -> None:
        try:
            await failure
            sent.append(frame)
        finally:
            finished.set()  # the error goes on up to the queue's task in the same step

    async def close(code: int) -> None:
        raise AssertionError("a socket that went away is not closed by the hub")

    queue = SocketQueue(send, close, pairs=None)
    queue.start()
    assert queue.put("E1")
    await asyncio.sleep(0)  # the turn's writes: E1's send waits on `failure`
    failure.set_exception(ConnectionResetError("peer gone"))
    async with asyncio.timeout(2):
        await finished.wait()
    assert queue.kicked
    assert queue.put("E2") is False
    assert sent == []
    await queue.stop()


async def test_a_stopped_queue_writes_nothing_more_not_even_the_frames_due_this_turn() -> None:
    socket = FakeSocket()
    queue = queue_for(socket, pairs=None)
    assert queue.put("E1")
    await queue.stop()  # the socket went away before the turn's writes
    await asyncio.sleep(0)
    assert socket.frames == []
