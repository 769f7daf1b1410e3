"""The frames Kurs pushes that are not events from the bus: snapshot, gap, error, inbound.

One home for their shapes, shared by the WebSocket consumer, the SSE stream and the bridge's
replay. `with_seq` adds the JetStream stream sequence (docs/events.md#nats) to an envelope already
serialised.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from config.jsonenc import dumps
from rates.snapshot import snapshot
from realtime.events import utc_now_iso


def error_frame(detail: str) -> str:
    return dumps({"type": "error", "detail": detail})


def snapshot_frame(
    pairs: Iterable[str] | None,
    seq: int | None,
    epoch: str | None = None,
    *,
    expand: bool = False,
) -> str:
    """The latest course of each pair; `seq` is the last event it reflects (None: no stream) in
    the stream of `epoch` (docs/events.md#resume-without-loss); with `expand`, each course lists
    its sources."""
    pairs = None if pairs is None else sorted(pairs)
    frame: dict[str, Any] = {
        "type": "snapshot",
        "data": {"courses": snapshot.courses(pairs, expand=expand), "pairs": pairs},
        "ts": utc_now_iso(),
    }
    if seq is not None:
        frame["seq"] = seq
        if epoch is not None:
            frame["epoch"] = epoch
    return dumps(frame)


def gap_frame(since: int, first_available: int | None, epoch: str | None = None) -> str:
    """The events after `since` are gone (or, with None, cannot be read now): a snapshot follows.
    `epoch`: the stream `first_available` is of (None: not known)."""
    return _frame("gap", {"since": since, "first_available": first_available}, epoch=epoch)


def inbound_frame(subject: str, payload: Any, seq: int | None = None) -> str:
    return _frame("nats.inbound", {"subject": subject, "payload": payload}, seq=seq)


def _frame(kind: str, data: dict[str, Any], **marks: int | str | None) -> str:
    """A frame Kurs makes itself (an id of its own), with the `marks` that are not None."""
    frame: dict[str, Any] = {
        "type": kind,
        "data": data,
        "ts": utc_now_iso(),
        "id": str(uuid.uuid4()),
    }
    frame.update((name, value) for name, value in marks.items() if value is not None)
    return dumps(frame)


def with_seq(text: str, message: dict[str, Any], seq: int | None) -> str:
    """The envelope `text` (parsed as `message`) with `"seq": seq` as its last member.

    The published text is reused as is: appending before its closing brace costs a string copy,
    not a parse and a dump. A publisher that already sent a `seq` gets it replaced.
    """
    if seq is None:
        return text
    if "seq" in message:
        return dumps({**message, "seq": seq})
    body = text.rstrip()
    if body.endswith("{}"):  # pragma: no cover - an envelope always has type and data
        return dumps({**message, "seq": seq})
    return f'{body[:-1]},"seq":{seq}}}'
