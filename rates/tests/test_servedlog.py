"""The served log (every version of a pair's current rate, written with it) and `?at=`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import OperationalError
from django.utils import timezone

from edge.caching import IMMUTABLE, NO_CACHE
from edge.tests.asgi import both, call
from items.models import Item
from rates import servedlog, services
from rates.exceptions import InvalidQuery, NotServedAt
from rates.models import SERVED_FIELDS, CurrentRate, Rate, ServedRate, ServedValue
from rates.snapshot import snapshot
from rates.tests.support import make_quote, rate_events

Capture = Any


def item(code: str) -> Item:
    base, quote = code.split("-")
    return Item.objects.get_or_create(base=base, quote=quote)[0]


def accept(quote: Any, capture: Capture) -> None:
    with capture(execute=True):
        services.accept_quote(quote)


# --- Writes ------------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_every_version_of_the_current_rate_is_logged_as_written(
    django_capture_on_commit_callbacks: Capture,
) -> None:
    btc = item("BTC-USD")
    accept(
        make_quote("binance", "BTC-USD", "100", bid="99.5", ask="100.5"),
        django_capture_on_commit_callbacks,
    )
    accept(make_quote("binance", "BTC-USD", "101"), django_capture_on_commit_callbacks)
    accept(make_quote("bybit", "BTC-USD", "101.2"), django_capture_on_commit_callbacks)
    services.provider_set_down("binance", True)
    with django_capture_on_commit_callbacks(execute=True):
        services.reevaluate()
    current = CurrentRate.objects.get(item=btc)
    versions = list(ServedRate.objects.filter(item=btc).order_by("served_at", "id"))
    assert [v.version for v in versions] == list(range(1, current.version + 1))
    assert [(v.provider, v.value, v.status) for v in versions] == [
        ("binance", Decimal(100), "live"),
        ("binance", Decimal(101), "live"),
        ("bybit", Decimal("101.2"), "failover"),
    ]
    assert versions[0].bid == Decimal("99.5")
    last = versions[-1]
    # Every column the read model shares with the log, and the version, is copied.
    shared = {field.name for field in ServedValue._meta.fields} | {"version"}
    assert set(SERVED_FIELDS) == shared
    for name in shared:
        assert getattr(last, name) == getattr(current, name), name
    assert (last.mode, last.n_sources) == ("priority", 1)
    served = [v.served_at for v in versions]
    assert served == sorted(served)


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_the_log_holds_exactly_what_rate_updated_announced(
    django_capture_on_commit_callbacks: Capture, published_events: list[tuple[str, Any]]
) -> None:
    """Every published version has its row, with the same fields, and no row was not published."""
    item("BTC-USD")
    item("BTC-RUB")
    for quote in (
        make_quote("binance", "BTC-USD", "90000"),
        make_quote("cbr", "USD-RUB", "80", age=60),  # BTC-RUB as a cross rate, binance+cbr
        make_quote("coingecko", "BTC-RUB", "7200100"),
        make_quote("binance", "BTC-USD", "90001"),
    ):
        accept(quote, django_capture_on_commit_callbacks)
    announced = sorted(
        (
            data["direction"],
            data["version"],
            data["provider"],
            Decimal(data["value"]),
            data["status"],
        )
        for data in rate_events(published_events)
    )
    logged = sorted(
        (row.item.code, row.version, row.provider, row.value, row.status)
        for row in ServedRate.objects.select_related("item")
    )
    assert len(announced) >= 4
    assert logged == announced


# Committed for real: the failure must roll back a real transaction (and `_persist` closes the
# connection it leaves on PostgreSQL).
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_failed_log_write_rolls_back_the_current_rate_with_it(
    django_capture_on_commit_callbacks: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    item("BTC-USD")

    def dropped(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("terminating connection due to administrator command")

    with monkeypatch.context() as patched:
        patched.setattr(servedlog, "record_all", dropped)
        accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    assert not CurrentRate.objects.exists()
    assert not Rate.objects.exists()
    accept(make_quote("binance", "BTC-USD", "100"), django_capture_on_commit_callbacks)
    assert CurrentRate.objects.get().version == ServedRate.objects.get().version == 1


def served(
    it: Item, at: datetime, version: int, *, provider: str = "binance", **extra: Any
) -> ServedRate:
    fields: dict[str, Any] = {
        "provider": provider,
        "value": Decimal(100 + version),
        "source_time": at,
        "checked_at": at,
        "received_at": at,
        "status": "live",
        "version": version,
        **extra,
    }
    servedlog.record(it.id, fields, served_at=at, event_id=extra.pop("event_id", None))
    return ServedRate.objects.get(item=it, version=version)


@pytest.mark.django_db
def test_prune_keeps_the_version_still_served_at_the_cutoff() -> None:
    btc, eth = item("BTC-USD"), item("ETH-USD")
    now = timezone.now()
    for version, days in enumerate((100, 95, 91, 89, 1), start=1):
        served(btc, now - timedelta(days=days), version)
    served(eth, now - timedelta(days=200), 1)  # never changed since: still what is served
    assert services.prune_history(days=90) == 0
    assert sorted(ServedRate.objects.filter(item=btc).values_list("version", flat=True)) == [
        3,
        4,
        5,
    ]
    assert ServedRate.objects.filter(item=eth).count() == 1


@pytest.mark.django_db
def test_record_seq_names_the_version_its_event_announced() -> None:
    btc = item("BTC-USD")
    now = timezone.now()
    served(btc, now - timedelta(seconds=2), 1, event_id="e-1")
    served(btc, now - timedelta(seconds=1), 2, event_id="e-2")
    assert servedlog.record_seq("e-1", 41) == 1
    # An event acked twice in one batch (relayed) keeps its first sequence.
    assert servedlog.record_seqs([("e-2", 42), ("unknown", 43), ("e-2", 44)]) == 1
    assert list(ServedRate.objects.order_by("version").values_list("seq", flat=True)) == [41, 42]


# The recorder writes from its own thread, which must see committed rows.
@pytest.mark.django_db(transaction=True)
def test_acks_are_recorded_in_batches_off_the_callers_thread() -> None:
    btc = item("BTC-USD")
    now = timezone.now()
    for version in (1, 2, 3):
        served(btc, now - timedelta(seconds=4 - version), version, event_id=f"e-{version}")
    recorder = servedlog.SeqRecorder(batch=2)
    for event_id, seq in (("e-1", 7), ("e-2", 8), ("another event", 9), ("e-3", 10)):
        recorder.ack(event_id, seq)
    assert recorder.wait_idle(10)
    assert list(ServedRate.objects.order_by("version").values_list("seq", flat=True)) == [7, 8, 10]
    recorder.ack("e-1", 99)  # a duplicate ack (a relayed event) keeps the first seq
    assert recorder.wait_idle(10)
    assert ServedRate.objects.get(version=1).seq == 7


@pytest.mark.django_db(transaction=True)
def test_the_recorder_outlives_a_batch_that_fails_for_any_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    btc = item("BTC-USD")
    served(btc, timezone.now(), 1, event_id="e-1")
    real = servedlog.record_seqs
    calls: list[int] = []

    def broken_once(acks: list[tuple[str, int]]) -> int:
        calls.append(len(acks))
        if len(calls) == 1:
            raise RuntimeError("not a database error")
        return real(acks)

    monkeypatch.setattr(servedlog, "record_seqs", broken_once)
    recorder = servedlog.SeqRecorder()
    recorder.ack("lost", 1)
    assert recorder.wait_idle(10)  # the failed batch is counted done, not left pending
    recorder.ack("e-1", 5)
    assert recorder.wait_idle(10)
    assert (len(calls), ServedRate.objects.get(version=1).seq) == (2, 5)
    # Logged by the recorder, which went on in the same thread (not a thread that died).
    failed = [r for r in caplog.records if "acks not recorded" in r.getMessage()]
    assert [(r.levelname, r.threadName, r.exc_info is not None) for r in failed] == [
        ("ERROR", "served-seq", True)
    ]


# --- Reads at an instant -----------------------------------------------------------------------
@pytest.mark.django_db
def test_version_at_is_the_one_served_then_judged_then(settings: Any) -> None:
    settings.KURS_STALE_AFTER = 30
    btc, rub = item("BTC-USD"), item("USD-RUB")
    now = timezone.now()
    t0 = now - timedelta(hours=5)
    served(btc, t0, 1)
    served(btc, t0 + timedelta(seconds=10), 2)
    served(rub, t0, 1, provider="cbr")

    first = servedlog.version_at(t0 + timedelta(seconds=5), item_id=btc.id, now=now)
    assert (first.row.version, first.valid_until) == (1, t0 + timedelta(seconds=10))
    assert first.course("BTC-USD")["status"] == "live"
    assert servedlog.version_at(t0, item_id=btc.id, now=now).row.version == 1
    # Carried forward at most binance's window (KURS_STALE_AFTER) since its confirmation...
    later = servedlog.version_at(t0 + timedelta(seconds=40), item_id=btc.id, now=now)
    assert (later.row.version, later.valid_until) == (2, None)
    assert later.course("BTC-USD")["status"] == "live"
    late = servedlog.version_at(t0 + timedelta(seconds=41), code="BTC-USD", now=now)
    assert late.course("BTC-USD")["status"] == "stale"
    # ...and the Bank of Russia's daily file for a day.
    assert (
        servedlog.version_at(t0 + timedelta(hours=4), code="USD-RUB", now=now).course("USD-RUB")[
            "status"
        ]
        == "live"
    )

    with pytest.raises(NotServedAt):
        servedlog.version_at(t0 - timedelta(seconds=1), item_id=btc.id, now=now)
    with pytest.raises(InvalidQuery, match="future"):
        servedlog.version_at(now + timedelta(seconds=1), item_id=btc.id, now=now)
    with pytest.raises(InvalidQuery, match="retention"):
        servedlog.version_at(now - timedelta(days=91), item_id=btc.id, now=now)


# --- The API -----------------------------------------------------------------------------------
# A day ago, on a whole second: inside the retention whenever the tests run.
T0 = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
def history(settings: Any) -> Iterator[dict[str, Item]]:
    """BTC-USD served by binance (v1 at T0, v2 at T0+60 s, still current), bybit's history
    beside it, and the snapshot tracking BTC-USD. Transactional: the routes read in threads."""
    settings.KURS_STALE_AFTER = 30
    settings.KURS_PROVIDERS = ["binance", "bybit", "coingecko", "cbr"]
    settings.KURS_API_KEYS_REQUIRED = False
    btc = item("BTC-USD")
    evidence: dict[str, Any] = {
        "mode": "consensus",
        "n_sources": 3,
        "dispersion_bps": Decimal("4.5"),
    }
    served(btc, T0, 1, bid=Decimal("100.5"), ask=Decimal("101.5"), **evidence)
    served(btc, T0 + timedelta(seconds=60), 2)
    CurrentRate.objects.create(
        item=btc,
        provider="binance",
        value=Decimal(102),
        source_time=T0,
        checked_at=T0,
        received_at=T0,
        status="live",
        version=2,
    )
    for provider, value, ago in (("binance", "101", 5), ("bybit", "101.1", 10), ("cbr", "1", 90)):
        moment = T0 + timedelta(seconds=30 - ago)
        Rate.objects.create(
            item=btc,
            provider=provider,
            value=Decimal(value),
            source_time=moment,
            received_at=moment,
        )
    snapshot.reset()
    snapshot.load()
    yield {"BTC-USD": btc}
    snapshot.reset()


def at_query(moment: datetime, extra: str = "") -> bytes:
    return f"at={iso(moment)}{extra}".encode()


@pytest.mark.django_db(transaction=True)
async def test_latest_at_an_instant_answers_the_version_served_then(
    history: dict[str, Item],
) -> None:
    path = f"/api/v1/items/{history['BTC-USD'].id}/rates/latest"
    answer = await call(path, at_query(T0 + timedelta(seconds=30)))
    assert answer.status == 200, answer.body
    body = answer.json()
    assert (body["value"], body["version"], body["bid"]) == (101, 1, Decimal("100.5"))
    assert (body["valid_from"], body["valid_until"]) == (iso(T0), iso(T0 + timedelta(seconds=60)))
    assert (body["seq"], body["status"], body["age_s"]) == (None, "live", 30.0)
    assert "sources" not in body
    assert answer.header("Cache-Control") == IMMUTABLE.encode()
    etag = answer.header("ETag")
    assert etag is not None
    assert etag.startswith(b'"')
    again = await call(path, at_query(T0 + timedelta(seconds=30)), [(b"if-none-match", etag)])
    assert (again.status, again.body, again.header("ETag")) == (304, b"", etag)

    # The current version: valid_until null, so not immutable; stale once carried past 30 s.
    now_answer = await call(path, at_query(T0 + timedelta(seconds=120)))
    assert now_answer.json()["valid_until"] is None
    assert now_answer.json()["status"] == "stale"
    assert now_answer.header("Cache-Control") == NO_CACHE.encode()


@pytest.mark.django_db(transaction=True)
async def test_expand_sources_shows_each_providers_quote_at_the_instant(
    history: dict[str, Item],
) -> None:
    path = f"/api/v1/items/{history['BTC-USD'].id}/rates/latest"
    answer = await call(path, at_query(T0 + timedelta(seconds=30), "&expand=sources"))
    assert answer.status == 200, answer.body
    sources = {s["provider"]: s for s in answer.json()["sources"]}
    assert set(sources) == {"binance", "bybit", "cbr"}
    assert (sources["binance"]["value"], sources["binance"]["age_s"]) == (101, 5.0)
    assert (sources["bybit"]["excluded"], sources["bybit"]["reason"]) == (False, None)
    # cbr's daily window keeps its quote fresh: only a quote past its window is excluded.
    assert sources["cbr"]["excluded"] is False
    stale = await call(path, at_query(T0 + timedelta(seconds=200), "&expand=sources"))
    by_name = {s["provider"]: s for s in stale.json()["sources"]}
    assert (by_name["binance"]["excluded"], by_name["binance"]["reason"]) == (True, "stale")
    assert by_name["cbr"]["excluded"] is False


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("at", "status", "words"),
    [
        ("2999-01-01T00:00:00Z", 422, "future"),
        ("2001-01-01T00:00:00Z", 422, "retention"),
        (iso(T0 - timedelta(seconds=1)), 404, "no rate served"),
        ("yesterday", 422, "ISO-8601"),
    ],
)
async def test_an_instant_with_no_answer_says_why_in_json(
    history: dict[str, Item], at: str, status: int, words: str
) -> None:
    btc = history["BTC-USD"].id
    for path in (
        f"/api/v1/items/{btc}/rates/latest",
        "/api/v1/rates/BTC/USD",
        "/api/v1/convert",
    ):
        query = f"at={at}" + ("&from=BTC&to=USD&amount=1" if path.endswith("convert") else "")
        fast, slow = await both(path, query.encode())
        assert fast.comparable() == slow.comparable(), path
        assert fast.status == status, (path, fast.body)
        assert words in fast.json()["detail"], fast.body
        assert fast.header("Cache-Control") == b"no-store"


@pytest.mark.django_db(transaction=True)
async def test_a_pair_and_a_conversion_at_an_instant_on_both_entrances(
    history: dict[str, Item],
) -> None:
    moment = at_query(T0 + timedelta(seconds=30))
    fast, slow = await both("/api/v1/rates/BTC/USD", moment)
    assert fast.comparable() == slow.comparable()
    assert fast.status == 200, fast.body
    pair = fast.json()
    assert (pair["pair"], pair["value"], pair["version"], pair["stale"]) == (
        "BTC-USD",
        101,
        1,
        False,
    )
    assert pair["valid_until"] == iso(T0 + timedelta(seconds=60))
    # The evidence the version was served with, not today's.
    assert (pair["mode"], pair["n_sources"], pair["dispersion_bps"]) == ("consensus", 3, 4.5)
    assert fast.header("Cache-Control") == IMMUTABLE.encode()

    expanded = await call("/api/v1/rates/BTC/USD", moment + b"&expand=sources")
    assert {s["provider"] for s in expanded.json()["sources"]} == {"binance", "bybit", "cbr"}

    inverse = (await call("/api/v1/rates/USD/BTC", moment)).json()
    assert (inverse["derived"], inverse["version"]) == (True, 1)

    fast, slow = await both("/api/v1/convert", moment + b"&from=BTC&to=USD&amount=2")
    assert fast.comparable() == slow.comparable()
    converted = fast.json()
    assert (converted["result"], converted["valid_from"]) == (202, iso(T0))

    body = json.dumps({"from": "BTC", "to": "USD", "amount": "2", "at": iso(T0)}).encode()
    fast, slow = await both(
        "/api/v1/convert", b"", [(b"content-type", b"application/json")], method="POST", body=body
    )
    assert fast.comparable() == slow.comparable()
    assert fast.json()["result"] == 202
    assert fast.header("Cache-Control") == b"no-store"  # a POST's answer is never cached

    untracked = await call("/api/v1/rates/AAA/BBB", moment)
    assert untracked.status == 404
    assert "not tracked" in untracked.json()["detail"]
