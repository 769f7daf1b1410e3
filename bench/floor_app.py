"""The floor of `/courses` on Kurs's server: a bare ASGI app, no edge, no Django, no log.

It answers every HTTP request with the `/courses` bytes and the very headers Kurs sent with them
(`KURS_BENCH_COURSES_BODY`, `KURS_BENCH_COURSES_HEADERS`: written by `bench/bench_courses.py`),
a fresh `X-Request-ID` on each as the edge gives; served by the same uvicorn and Kurs's HTTP
protocol (`bench/bench_courses.py --floor`). What it costs per request is what any app on this
server pays before doing anything: the bound of what trimming the edge can reach.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

BODY = Path(os.environ["KURS_BENCH_COURSES_BODY"]).read_bytes()
HEADERS = [
    (name.encode("latin-1"), value.encode("latin-1"))
    for name, value in json.loads(Path(os.environ["KURS_BENCH_COURSES_HEADERS"]).read_text())
    if name.lower() != "x-request-id"
]
_ids = itertools.count(1)
_START = {"type": "http.response.start", "status": 200}
_BODY = {"type": "http.response.body", "body": BODY, "more_body": False}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to start
    request_id = b"%032x" % next(_ids)
    await send({**_START, "headers": [*HEADERS, (b"X-Request-ID", request_id)]})
    await send(_BODY)
