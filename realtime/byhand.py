"""Running a coroutine by hand: as far as it goes without suspending, then, only if it does
suspend, the rest in a task.

The hot paths' sends (a frame to a socket, an event to nats-py) are coroutines that nearly
always complete without waiting; run by hand they cost a call, not a task and its wake-up on
the next turn of the loop.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any


@types.coroutine
def resume_suspended(coro: Coroutine[Any, Any, None], awaiting: Any) -> Generator[Any, Any, None]:
    """The rest of `coro`, already run by hand until it suspended on `awaiting`, as an awaitable
    a task can run: what `yield from` does, from the middle. Each value the coroutine yields
    (the future it waits on) goes up to the task, and each result or exception comes back down.
    """
    while True:
        try:
            sent = yield awaiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation included: the coroutine sees it as thrown
            try:
                awaiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                awaiting = coro.send(sent)
            except StopIteration:
                return
