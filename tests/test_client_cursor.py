"""The Python client's rules without a server (clients/python): the cursor that keeps a
resumed stream free of duplicates and reordering (kurs_client/cursor.py), and the models'
parsing. tests/test_client.py runs the client against real Kurs processes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import kurs_client
import pytest
from kurs_client import models
from kurs_client.cursor import Cursor


# --- The cursor's rules, frame by frame ---
def rate_frame(pair: str, version: int, seq: int | None) -> dict[str, Any]:
    data = {
        "direction": pair,
        "value": Decimal("1.5"),
        "provider": "binance",
        "source_time": "2026-11-23T06:00:00Z",
        "checked_at": "2026-11-23T06:00:00Z",
        "status": "live",
        "derived": False,
        "route": [],
        "version": version,
    }
    frame: dict[str, Any] = {"type": "rate.updated", "data": data, "ts": "2026-11-23T06:00:00Z"}
    if seq is not None:
        frame["seq"] = seq
    return frame


def handed_on(cursor: Cursor, frames: list[dict[str, Any]]) -> list[tuple[int, int | None]]:
    events = [cursor.accept(frame) for frame in frames]
    return [(e.data.version, e.seq) for e in events if e and isinstance(e.data, models.RateUpdate)]


def test_the_cursor_drops_replayed_and_older_frames_and_follows_a_new_stream() -> None:
    cursor = Cursor()
    cursor.connected()
    got = handed_on(cursor, [rate_frame("A-B", 1, 10), rate_frame("A-B", 2, 11)])
    assert got == [(1, 10), (2, 11)]
    # A resume whose replay overlaps what was seen, then the fallback's unnumbered frames.
    cursor.connected()
    frames = [rate_frame("A-B", 2, 11), rate_frame("A-B", 3, 12), rate_frame("A-B", 3, None)]
    assert handed_on(cursor, [*frames, rate_frame("A-B", 4, None)]) == [(3, 12), (4, None)]
    assert (cursor.last_seq, cursor.dropped.duplicate_seq, cursor.dropped.old_version) == (12, 1, 1)
    # The stream made anew under a live connection: its numbers start again, and are followed.
    assert handed_on(cursor, [rate_frame("A-B", 5, 1), rate_frame("A-B", 6, 2)]) == [
        (5, 1),
        (6, 2),
    ]
    assert cursor.last_seq == 2


def test_the_cursor_hands_a_gap_on_with_the_snapshot_that_follows_it() -> None:
    cursor = Cursor(last_seq=500)
    cursor.connected()
    assert cursor.accept({"type": "gap", "data": {"since": 500, "first_available": 900}}) is None
    assert cursor.accept({"type": "tick", "data": {}}) is None
    course = {**rate_frame("A-B", 7, None)["data"], "stale": False, "age_s": 1}
    snapshot = {"type": "snapshot", "data": {"courses": [course], "pairs": ["A-B"]}, "seq": 950}
    event = cursor.accept(snapshot)
    assert event is not None
    assert event.type == "gap"
    assert event.seq == 950
    assert isinstance(event.data, models.Gap)
    assert event.data.first_available == 900
    assert event.data.snapshot is not None
    assert event.data.snapshot.courses[0].version == 7
    assert handed_on(cursor, [rate_frame("A-B", 7, 951), rate_frame("A-B", 8, 952)]) == [(8, 952)]


def test_the_cursor_keeps_the_epoch_of_its_seq_and_the_stream_sends_both() -> None:
    cursor = Cursor()
    stream = kurs_client.EventStream("http://kurs.test")
    stream.cursor = cursor
    cursor.connected()
    snapshot = {"type": "snapshot", "data": {"courses": [], "pairs": None}, "seq": 40}
    cursor.accept({**snapshot, "epoch": "m1abc"})
    assert (cursor.last_seq, cursor.epoch) == (40, "m1abc")
    assert handed_on(cursor, [rate_frame("A-B", 1, 41)]) == [(1, 41)]
    assert (stream.query()["since"], stream.query()["epoch"]) == ("41", "m1abc")
    # The numbers start again under the connection: the new stream's epoch is not known yet, so
    # the resume sends `since` alone (a sequence of the server's current stream).
    assert handed_on(cursor, [rate_frame("A-B", 2, 1)]) == [(2, 1)]
    assert (cursor.last_seq, cursor.epoch) == (1, None)
    assert "epoch" not in stream.query()
    # A gap names the stream the resume was answered from; its snapshot gives the position.
    cursor.connected()
    gap = {"type": "gap", "data": {"since": 1, "first_available": 1}, "epoch": "m2xyz"}
    assert cursor.accept(gap) is None
    event = cursor.accept({**snapshot, "seq": 90, "epoch": "m2xyz"})
    assert event is not None
    assert isinstance(event.data, models.Gap)
    assert (event.seq, event.epoch) == (90, "m2xyz")
    assert (cursor.last_seq, cursor.epoch) == (90, "m2xyz")
    # A server without epochs: none is kept, none is sent.
    cursor.accept({**snapshot, "seq": 91})
    assert cursor.epoch is None
    assert "epoch" not in stream.query()


def test_models_keep_unknown_fields_and_never_use_floats() -> None:
    text = (
        '{"pair": "BTC-USD", "value": 54001.123456789012345678, "provider": "binance",'
        ' "source_time": "2026-11-23T06:00:00Z", "age_s": 0.5, "derived": false,'
        ' "stale": false, "mode": "consensus", "n_sources": 3, "dispersion_bps": 1.25,'
        ' "bid": 54000.5, "ask": null, "something_new": {"x": 1.1}}'
    )
    rate = models.PairRate.from_json(models.loads(text))
    assert rate.value == Decimal("54001.123456789012345678")
    assert (rate.mode, rate.n_sources, rate.dispersion_bps) == ("consensus", 3, Decimal("1.25"))
    assert (rate.bid, rate.ask) == (Decimal("54000.5"), None)
    assert rate.extra == {"something_new": {"x": Decimal("1.1")}}
    with pytest.raises(kurs_client.SchemaError):
        models.PairRate.from_json({"pair": "BTC-USD"})
