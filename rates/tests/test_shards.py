"""Sharded ownership (rates.shards): which shard a pair is in, one lease per shard, an owner
writing only its shards' pairs while quoting the legs they need, the global duties, the relay
filter and the merged answer to `POST /tasks/run`."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from items.models import Item
from rates import fetch_control, services, shards
from rates.board import QuoteBoard
from rates.lease import LIVE_RATES
from rates.models import CurrentRate, OwnerLease, Rate
from rates.tests.support import make_quote, rate_events


def item(code: str) -> Item:
    base, quote = code.split("-")
    return Item.objects.update_or_create(base=base, quote=quote, defaults={"is_active": True})[0]


def test_a_pair_s_shard_is_crc32_of_its_code_whatever_the_case_or_the_process() -> None:
    assert shards.shard_of("BTC-RUB", 1) == 0
    for count in (2, 3, 7):
        assert shards.shard_of("BTC-RUB", count) == zlib.crc32(b"BTC-RUB") % count
        assert shards.shard_of("btc-rub", count) == shards.shard_of("BTC-RUB", count)
    # Spread: 1,000 synthetic pairs over 4 shards, none far from a quarter.
    spread = Counter(shards.shard_of(f"SYN{n:04d}-USDT", 4) for n in range(1000))
    assert set(spread) == {0, 1, 2, 3}
    assert all(200 <= size <= 300 for size in spread.values()), spread


def test_one_shard_keeps_the_lease_of_before_shards() -> None:
    assert shards.lease_name(0, 1) == LIVE_RATES
    assert shards.lease_name(1, 2) == f"{LIVE_RATES}/1of2"


def test_an_outbox_row_belongs_to_the_shard_of_the_pair_it_is_about(settings: Any) -> None:
    settings.KURS_NATS_PREFIX = "kurs"
    pair = "ETH-USD"
    mine = shards.shard_of(pair, 4)
    rate = json.dumps({"type": "rate.updated", "data": {"direction": pair}})
    assert shards.event_shard(f"kurs.rates.{pair}", rate, 4) == mine
    excluded = json.dumps({"type": "quote.excluded", "data": {"direction": pair}})
    assert shards.event_shard("kurs.quotes.excluded", excluded, 4) == mine
    created = json.dumps({"type": "item.created", "data": {"code": pair}})
    assert shards.event_shard("kurs.items.created", created, 4) == mine
    peg = json.dumps({"type": "peg.broken", "data": {"peg": "USDT-USD"}})
    assert shards.event_shard("kurs.peg.broken", peg, 4) == shards.GLOBAL_SHARD
    assert shards.event_shard("kurs.rates.ETH-USD", "", 1) == 0


def test_shard_owners_answers_are_merged_counting_each_owner_once() -> None:
    a = {"stored": 3, "providers": {"binance": "ok", "bybit": "ok"}, "duration_ms": 40}
    b = {"stored": 5, "providers": {"binance": "ok", "bybit": "error: 500"}, "duration_ms": 90}
    merged = fetch_control.merge_reports(
        [{**a, "owner": "a", "shards": [0, 2]}, {**a, "owner": "a"}, {**b, "owner": "b"}]
    )
    assert merged == {
        "stored": 8,
        "providers": {"binance": "ok", "bybit": "error: 500"},
        "duration_ms": 90,
    }
    assert fetch_control.merge_reports([]) is None


@pytest.mark.django_db(transaction=True)
def test_each_shard_has_its_lease_and_fetchers_share_them_fairly() -> None:
    first = shards.Shards(count=2, holder="a")
    assert first.take() == {0, 1}  # alone: every shard
    second = shards.Shards(count=2, holder="b")
    assert second.take() == set()  # both held; but it is present now
    assert first.take() == {0, 1}
    assert first.surplus({0, 1}) == {1}  # its fair share is one: the global shard stays
    first.release({1})
    assert second.take() == {1}  # below its share: at once
    assert first.take() == {0}
    assert {row.name: row.holder for row in OwnerLease.objects.filter(name__contains="of")} == {
        shards.lease_name(0, 2): "a",
        shards.lease_name(1, 2): "b",
    }
    # The second fetcher dies (SIGKILL: nothing released): once its lease and presence expired,
    # the first is alone again and takes the shard at once.
    OwnerLease.objects.filter(holder="b").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert first.take() == {0, 1}
    assert first.held({0, 1})
    first.release()
    assert not OwnerLease.objects.filter(holder="a").exists()  # b's expired presence is left


@pytest.mark.django_db(transaction=True)
def test_the_safety_net_takes_every_free_shard_at_once() -> None:
    other = shards.Shards(count=3, holder="other")
    taken = other.take()
    net = shards.Shards(count=3, holder="net")
    assert net.take(greedy=True) == {0, 1, 2} - taken


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_an_owner_writes_only_its_shard_s_pairs_but_quotes_the_legs_they_need(
    fresh_board: QuoteBoard,
    django_capture_on_commit_callbacks: Any,
    published_events: list[tuple[str, dict[str, Any]]],
) -> None:
    btc_rub, usd_rub = item("BTC-RUB"), item("USD-RUB")
    # This owner's shard holds BTC-RUB; USD-RUB's item belongs to another owner.
    fresh_board.owns = lambda code: code == "BTC-RUB"
    assert set(services.active_items(board=fresh_board)) == {"BTC-RUB"}
    with django_capture_on_commit_callbacks(execute=True):
        services.accept_quote(make_quote("binance", "BTC-USD", "90000"))
        leg = services.accept_quote(make_quote("cbr", "USD-RUB", "80", age=3600))
    assert leg.accepted  # the leg is quoted and kept in memory only
    assert not leg.stored
    (cross,) = leg.derived
    assert cross.stored
    assert CurrentRate.objects.filter(item=btc_rub).exists()
    assert not CurrentRate.objects.filter(item=usd_rub).exists()
    assert not Rate.objects.filter(item=usd_rub).exists()
    assert rate_events(published_events, "USD-RUB") == []
    assert [event["provider"] for event in rate_events(published_events, "BTC-RUB")] == [
        "binance+cbr"
    ]


@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_only_the_global_shard_s_owner_does_the_global_duties(fresh_board: QuoteBoard) -> None:
    assert fresh_board.global_writable()  # one shard: any writer does them
    owned: set[int] = {1}
    fresh_board.duty = lambda: shards.GLOBAL_SHARD in owned
    assert fresh_board.writable()
    assert not fresh_board.global_writable()
    owned.add(0)
    assert fresh_board.global_writable()
    fresh_board.guard = lambda: False
    assert not fresh_board.global_writable()


@pytest.mark.django_db(transaction=True)
def test_no_shard_is_taken_while_fetchers_with_another_shard_count_own_live_state() -> None:
    one = shards.Shards(count=1, holder="old")
    assert one.take() == {0}  # a fetcher of before the change: every pair
    two = shards.Shards(count=2, holder="new")
    assert two.take() == set()
    one.release()
    assert two.take() == {0, 1}
