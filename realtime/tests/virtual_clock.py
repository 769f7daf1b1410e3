"""An event loop whose clock moves only when nothing else can: timing tests without the machine.

`VirtualClockLoop.time()` starts at 0 and stands still while any callback is ready. When the loop
would wait, it looks for I/O without waiting and, finding none, jumps its clock to the next timer
instead of sleeping. So a 150 ms interval in the hub is exactly 150 ms of this clock, however busy
the machine is, and a test that waits for something which never comes fails at its own timeout
(a timer too) at once, instead of hanging. Built on public asyncio parts: a selector wrapper
handed to `SelectorEventLoop`, and `time()`.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        ready = super().select(0)
        if not ready:
            self._advance(timeout)  # the loop's next timer is due now
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_JumpingSelector(self._jump))

    def _jump(self, seconds: float) -> None:
        self._now += seconds

    def time(self) -> float:
        return self._now


def on_virtual_clock(test: Callable[[], Awaitable[Any]]) -> Callable[[], None]:
    """Run the async `test` on a VirtualClockLoop of its own (a plain test function for pytest)."""

    def run() -> None:
        loop = VirtualClockLoop()
        try:
            loop.run_until_complete(test())
        finally:
            loop.close()

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run
