"""A response head and body written by uvicorn's cycle and by Kurs's
(`edge.serverprotocol.KursCycle`), in-process: the CPU time of each per answer, with `/courses`'
headers.

    .venv/bin/python bench/bench_response_head.py [-n 20000]

Each answer makes a cycle as uvicorn's protocol does, sends the head (`/courses`' headers, the
server's two and a new request id) and a 586-byte body into a transport that drops them; the two
take turns, seven rounds each, and the best and the median round are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uvicorn.protocols.http.flow_control import FlowControl  # noqa: E402
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle  # noqa: E402

from edge.serverprotocol import KursCycle  # noqa: E402

HEADERS = [
    (b"Content-Type", b"application/json; charset=utf-8"),
    (b"ETag", b'"0123456789abcdef01234567"'),
    (b"Content-Length", b"586"),
    (b"Cache-Control", b"max-age=1, stale-while-revalidate=2, stale-if-error=30"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"same-origin"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
]
SERVER = [(b"server", b"uvicorn"), (b"date", b"Mon, 07 Dec 2026 01:00:00 GMT")]
BODY = b"x" * 586


class Dropped:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def per_answer(kind: type[RequestResponseCycle], ids: list[bytes]) -> float:
    """CPU microseconds per answer."""
    transport: Any = Dropped()
    flow = FlowControl(transport)
    logger = logging.getLogger("bench")
    started = time.process_time()
    for request_id in ids:
        cycle = kind(
            scope={"method": "GET"},  # type: ignore[typeddict-item]  # what `send` reads of it
            transport=transport,
            flow=flow,
            logger=logger,
            access_logger=logger,
            access_log=False,
            default_headers=SERVER,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=True,
            on_response=lambda: None,
        )
        headers = [*HEADERS, (b"X-Request-ID", request_id)]
        await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
        await cycle.send({"type": "http.response.body", "body": BODY, "more_body": False})
    return (time.process_time() - started) / len(ids) * 1e6


async def main(n: int) -> None:
    ids = [f"{i:032x}".encode() for i in range(n)]
    rounds: dict[str, list[float]] = {"uvicorn": [], "Kurs (KursCycle)": []}
    for _ in range(7):
        rounds["uvicorn"].append(await per_answer(RequestResponseCycle, ids))
        rounds["Kurs (KursCycle)"].append(await per_answer(KursCycle, ids))
    for name, got in rounds.items():
        print(
            f"{name:<18} best {min(got):.2f} us, median {statistics.median(got):.2f} us per answer"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000)
    asyncio.run(main(parser.parse_args().n))
