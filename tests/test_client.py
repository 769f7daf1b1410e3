"""The Python client (clients/python, docs/client.md) against real Kurs processes.

One stack for the module: a nats-server with JetStream and a redis-server of its own on free
ports, the exchange emulator (prices moving every 0.5 s), a fetcher polling every second and a
uvicorn web process (tests/stack.py). The models are checked against the OpenAPI document that
web process serves, the REST calls against its answers and the database, and the stream through
web processes killed and restarted and NATS killed and restarted under it. The resume figures
over 20 disconnects are measured by bench/bench_client_resume.py.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import typing
from collections.abc import AsyncIterator
from dataclasses import fields
from decimal import Decimal
from typing import Any

import httpx
import kurs_client
import pytest
import pytest_asyncio
from kurs_client import models

from tests.clientrun import (
    Kurs,
    caught_up,
    database_versions,
    first_versions,
    kurs_stack,
    recording,
    versions_report,
)
from tests.services import ROOT, free_port
from tests.stack import wait_until

pytestmark = [
    pytest.mark.nats,
    pytest.mark.redis,
    pytest.mark.timeout(240),
    pytest.mark.asyncio(loop_scope="module"),
]

PAIRS = ("BTC-USD", "ETH-USD")
WITHIN = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kurs(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Kurs]:
    async with kurs_stack(tmp_path_factory.mktemp("client"), PAIRS, seed=11) as running:
        yield running


# --- The models against the live OpenAPI document ---
REST_MODELS: dict[type[models.Model], str] = {
    models.CurrentRate: "CurrentRateOut",
    models.RouteLeg: "RouteLegOut",
    models.Item: "ItemDetailOut",
    models.ItemPage: "PagedItemOut",
    models.Rate: "RateOut",
    models.RatePage: "RateListOut",
    models.Candle: "CandleOut",
    models.Course: "CourseOut",
    models.Courses: "CoursesOut",
    models.PairRate: "PairRateOut",
    models.Conversion: "ConvertOut",
    models.Provider: "ProviderOut",
    models.FetchReport: "TaskRunOut",
}
EVENT_MODELS: dict[str, type[models.Model]] = {
    "rate.updated": models.RateUpdate,
    "item.created": models.Item,
    "item.deleted": models.ItemDeleted,
    "fetch.completed": models.FetchReport,
    "provider.state": models.ProviderState,
    "snapshot": models.Snapshot,
}


def json_names(model: type[models.Model]) -> tuple[set[str], set[str]]:
    """The JSON names of the model's fields: (all, required)."""
    renamed = {attr: key for key, attr in models.RENAMED.items()}
    every = {renamed.get(f.name, f.name) for f in fields(model) if f.name != "extra"}
    required = {
        renamed.get(f.name, f.name)
        for f in fields(model)
        if f.name != "extra" and f.default is f.default_factory  # both MISSING: no default
    }
    return every, required


def is_number(schema: dict[str, Any]) -> bool:
    options = schema.get("anyOf", [schema])
    return any(option.get("type") == "number" for option in options)


def check_model(model: type[models.Model], schema: dict[str, Any], where: str) -> None:
    properties = schema["properties"]
    every, required = json_names(model)
    assert required <= set(properties), f"{where}: the API lacks {required - set(properties)}"
    # A field the API added or renamed must be modelled (ItemDetailOut's `latest` is optional).
    assert set(properties) <= every, f"{where}: the client lacks {set(properties) - every}"
    hints = typing.get_type_hints(model)
    for name, prop in properties.items():
        if is_number(prop):
            attr = models.RENAMED.get(name, name)
            assert Decimal in typing.get_args(hints[attr]) or hints[attr] is Decimal, (where, name)


async def openapi(kurs: Kurs) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{kurs.url}/api/v1/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


async def test_the_models_match_the_served_openapi_document(kurs: Kurs) -> None:
    document = await openapi(kurs)
    schemas = document["components"]["schemas"]
    for model, name in REST_MODELS.items():
        check_model(model, schemas[name], name)
    stream = document["paths"]["/api/v1/stream"]["get"]["responses"]["200"]["content"]
    envelope = stream["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]
    assert {"type", "data", "ts", "id", "seq", "epoch"} == set(envelope["properties"])
    by_type = {
        rule["if"]["properties"]["type"]["const"]: rule["then"]["properties"]["data"]
        for rule in envelope["allOf"]
    }
    assert set(EVENT_MODELS) <= set(by_type), set(EVENT_MODELS) - set(by_type)
    for kind, model in EVENT_MODELS.items():
        if model is models.Item:  # the event carries the Item without `latest`
            every, _ = json_names(model)
            assert set(by_type[kind]["properties"]) <= every
            continue
        check_model(model, by_type[kind], kind)
    course = by_type["snapshot"]["properties"]["courses"]["items"]
    check_model(models.SnapshotCourse, course, "snapshot course")


# --- REST against the real server ---
async def test_rest_calls_answer_typed_models_with_every_digit(kurs: Kurs) -> None:
    stack = kurs.stack
    item_id = stack.item_id("BTC-USD")
    with kurs_client.Client(kurs.url) as client:
        # The value served is the database's, digit for digit (read until both saw one version).
        for _ in range(50):
            latest = await asyncio.to_thread(client.latest, item_id)
            row = stack.query(
                "SELECT value, version FROM rates_currentrate WHERE item_id = ?", item_id
            )[0]
            if int(row[1]) == latest.version:
                break
        assert isinstance(latest.value, Decimal)
        assert latest.value == Decimal(str(row[0]))
        assert latest.provider in ("binance", "bybit")
        assert latest.checked_at.tzinfo is not None
        pair = await asyncio.to_thread(client.rate, "BTC", "USD")
        assert (pair.pair, type(pair.value)) == ("BTC-USD", Decimal)
        detail = await asyncio.to_thread(client.item, item_id)
        assert (detail.code, detail.latest is not None) == ("BTC-USD", True)
        page = await asyncio.to_thread(client.items, is_active=True)
        assert sorted(i.code for i in page.items) == sorted(PAIRS)
        assert page.count == len(PAIRS)
        courses = await asyncio.to_thread(client.courses, ["ETH-USD", "BTC-USD"])
        assert [c.direction for c in courses.courses] == ["ETH-USD", "BTC-USD"]
        assert all(isinstance(c.value, Decimal) for c in courses.courses)
        converted = await asyncio.to_thread(client.convert, "BTC", "USD", Decimal("0.5"))
        assert (converted.from_, converted.to, converted.amount) == ("BTC", "USD", Decimal("0.5"))
        assert isinstance(converted.result, Decimal)
        assert converted.result > 0
        providers = await asyncio.to_thread(client.providers)
        assert {p.name for p in providers} == {"binance", "bybit"}
        assert (await asyncio.to_thread(client.health)).status in ("ok", "degraded")
        history = await asyncio.to_thread(client.history, item_id, limit=3)
        # The stack keeps storing rates: the page and its count are two reads apart.
        assert 1 <= len(history.items) <= 3
        assert history.count >= len(history.items)
        assert isinstance(history.items[0].value, Decimal)


async def test_api_errors_are_typed_and_carry_the_detail(kurs: Kurs) -> None:
    async with kurs_client.AsyncClient(kurs.url) as client:
        with pytest.raises(kurs_client.NotFound) as missing:
            await client.item(999_999)
        assert missing.value.status == 404
        assert missing.value.detail
        with pytest.raises(kurs_client.ValidationError) as invalid:
            await client.courses(["NOPE-XYZ"])
        assert "direction" in invalid.value.detail
        with pytest.raises(kurs_client.ValidationError) as bad_pair:
            await client.rate("B", "USD")
        assert "base" in bad_pair.value.detail
        with pytest.raises(TypeError):
            await client.convert("BTC", "USD", 0.5)  # type: ignore[arg-type]  # the point
        with pytest.raises(kurs_client.Unauthorized):
            await client.create_item("DOGE", "USD")  # no key: refused before sending
        latest = await client.latest(kurs.stack.item_id("ETH-USD"))
        assert isinstance(latest.value, Decimal)
    async with kurs_client.AsyncClient(kurs.url, api_key="not-a-key") as keyed:
        with pytest.raises(kurs_client.Unauthorized) as refused:
            await keyed.create_item("DOGE", "USD")
        assert refused.value.status == 401
        assert refused.value.detail
    with pytest.raises(kurs_client.TransportError):
        await kurs_client.AsyncClient(f"http://127.0.0.1:{free_port()}").health()


# --- The stream ---
def assert_every_version(kurs: Kurs, got: dict[str, list[int]], first: dict[str, int]) -> None:
    current = database_versions(kurs.stack, PAIRS)
    for pair in PAIRS:
        report = versions_report(got.get(pair, []), first[pair], current[pair])
        assert (report.missing, report.duplicates, report.out_of_order) == ([], 0, 0), (
            pair,
            report,
        )


async def test_the_stream_resumes_through_killed_web_processes_without_loss(kurs: Kurs) -> None:
    """Three web processes killed (SIGKILL) and one stopped (SIGTERM, close 1012) under a
    WebSocket stream and an SSE stream: each resumes by seq and gets every version once."""
    socket = kurs_client.AsyncClient(kurs.url).stream(list(PAIRS))
    sse = kurs_client.AsyncClient(kurs.url).stream(list(PAIRS), transport="sse")
    async with recording(socket) as by_socket, recording(sse) as by_sse:
        assert (socket.transport, sse.transport) == ("websocket", "sse")
        first = {name: first_versions(r) for name, r in (("ws", by_socket), ("sse", by_sse))}
        for kill in (True, True, False, True):
            await asyncio.gather(by_socket.until_more(2), by_sse.until_more(2))
            await asyncio.to_thread(kurs.restart_web, kill=kill)
        await asyncio.gather(by_socket.until_more(2), by_sse.until_more(2))
        # Caught up: each has the version the database holds now (or a later one).
        target = database_versions(kurs.stack, PAIRS)
        for recorder in (by_socket, by_sse):
            await wait_until(
                caught_up(recorder, target),
                within=WITHIN,
                what="the stream caught up",
            )
        assert (socket.reconnects, sse.reconnects) == (4, 4)
        assert socket.transport == "websocket"
    assert_every_version(kurs, by_socket.versions, first["ws"])
    assert_every_version(kurs, by_sse.versions, first["sse"])
    assert [e.type for e in by_socket.events if e.type in ("snapshot", "gap")] == ["snapshot"]
    seqs = [e.seq for e in by_socket.events if e.seq is not None]
    assert seqs == sorted(set(seqs))


async def test_the_stream_keeps_order_through_a_nats_restart(kurs: Kurs) -> None:
    """NATS killed under a stream: the web process feeds it over the Redis fallback
    (unnumbered), then over NATS again; then a web restart resumes by seq. No version twice or
    out of order; only versions in flight at the instant NATS died may be missing."""
    stream = kurs_client.AsyncClient(kurs.url).stream(list(PAIRS))
    async with recording(stream) as recorder:
        first = first_versions(recorder)
        await recorder.until_more(2)
        await asyncio.to_thread(kurs.nats.kill)
        outage = len(recorder.events)
        await recorder.until_more(4)
        assert any(e.seq is None for e in recorder.events[outage:])
        await asyncio.to_thread(kurs.nats.start)
        numbered = len(recorder.events)
        await wait_until(
            lambda: any(e.seq is not None for e in recorder.events[numbered:]),
            within=WITHIN,
            what="numbered events after NATS is back",
        )
        await asyncio.to_thread(kurs.restart_web)
        await recorder.until_more(2)
        target = database_versions(kurs.stack, PAIRS)
        await wait_until(
            caught_up(recorder, target),
            within=WITHIN,
            what="the stream caught up",
        )
    current = database_versions(kurs.stack, PAIRS)
    for pair in PAIRS:
        report = versions_report(recorder.versions[pair], first[pair], current[pair])
        assert (report.duplicates, report.out_of_order) == (0, 0), report
        assert len(report.missing) <= 3, report


async def test_a_resume_beyond_the_stream_yields_a_gap_with_the_fresh_snapshot(
    kurs: Kurs,
) -> None:
    async with kurs_client.AsyncClient(kurs.url).stream(["BTC-USD"], since=10**9) as stream:
        event = await anext(stream)
        assert event.type == "gap"
        assert isinstance(event.data, models.Gap)
        assert event.data.since == 10**9
        assert event.data.snapshot is not None
        assert [c.direction for c in event.data.snapshot.courses] == ["BTC-USD"]
        assert event.seq is not None
        assert stream.last_seq == event.seq < 10**9
        after = await anext(stream)
        while after.type != "rate.updated":  # fetch.completed, provider.state go to every stream
            assert after.type in ("fetch.completed", "provider.state"), after.type
            after = await anext(stream)
        assert after.seq is not None
        assert after.seq > event.seq


async def test_the_stream_resumes_in_the_epoch_it_read_and_a_stale_epoch_gets_a_gap(
    kurs: Kurs,
) -> None:
    """The client keeps the stream's epoch with its seq and sends both on a resume: the same
    epoch replays; another one (a stream deleted and made again since: realtime/tests/
    test_resume.py makes one) is answered with a gap, and the client takes the new epoch."""
    async with kurs_client.AsyncClient(kurs.url).stream(["BTC-USD"]) as first:
        snapshot = await anext(first)
        assert snapshot.type == "snapshot"
        assert first.last_seq is not None
        assert first.epoch is not None
        assert first.query()["epoch"] == first.epoch
        since, epoch = first.last_seq, first.epoch
        update = await anext(first)
        while update.type != "rate.updated":
            update = await anext(first)
    client = kurs_client.AsyncClient(kurs.url)
    async with client.stream(["BTC-USD"], since=since, epoch=epoch) as same:
        replayed = await anext(same)
        assert replayed.type != "gap"
        assert replayed.seq is not None
        assert replayed.seq > since
        assert same.epoch == epoch
    for transport in ("websocket", "sse"):
        async with client.stream(["BTC-USD"], since=since, epoch="0", transport=transport) as stale:
            gap = await anext(stale)
            assert gap.type == "gap", transport
            assert isinstance(gap.data, models.Gap)
            assert gap.data.since == since
            assert gap.data.snapshot is not None
            assert gap.epoch == epoch
            assert (stale.last_seq, stale.epoch) == (gap.seq, epoch)


async def test_the_blocking_stream_yields_the_same_events(kurs: Kurs) -> None:
    await asyncio.to_thread(blocking_stream, kurs.url)


def blocking_stream(url: str) -> None:
    with kurs_client.Client(url).stream(["ETH-USD"]) as stream:
        snapshot = next(stream)
        assert snapshot.type == "snapshot"
        assert isinstance(snapshot.data, models.Snapshot)
        update = stream.next(timeout=WITHIN)
        while update.type != "rate.updated":
            update = stream.next(timeout=WITHIN)
        assert isinstance(update.data, models.RateUpdate)
        assert update.data.direction == "ETH-USD"
        assert isinstance(update.data.value, Decimal)
        assert update.seq is not None
        assert stream.last_seq == update.seq


async def test_the_guide_example_runs_as_pasted(kurs: Kurs) -> None:
    """docs/client.md's example, with the address of this module's server."""
    guide = (ROOT / "docs" / "client.md").read_text()
    example = re.search(r"```python\n(.*?)```", guide, re.DOTALL)
    assert example is not None
    code = example.group(1).replace("http://127.0.0.1:8000", kurs.url)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"BTC-USD \d+(\.\d+)? from \w+", result.stdout), result.stdout
    assert "rate.updated" in result.stdout
