"""The evidence of a current rate on every REST surface, pricing and markup through the API
(docs/api.md#json-shapes, docs/rates.md#consensus-pricing): the owner's real decide step
writes the row, the real snapshot loads it, the Django test client asks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from items import services as item_services
from items.models import Item
from rates import services
from rates.snapshot import snapshot
from rates.tests.support import make_quote

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("rate_settings", "fresh_board")]
D = Decimal


@pytest.fixture
def auth() -> dict[str, Any]:
    _, raw_key = item_services.api_key_create(name="tests")
    return {"HTTP_X_API_KEY": raw_key}


@pytest.fixture
def loaded_snapshot() -> Iterator[None]:
    yield
    snapshot.reset()


def body(response: Any) -> Any:
    assert response.status_code < 300, response.content
    return json.loads(response.content, parse_float=Decimal)


def quote_btc_usd(capture: Any, skewed: str = "97010") -> None:
    with capture(execute=True):
        services.accept_quote(make_quote("binance", "BTC-USD", "97000", bid="96990", ask="97010"))
        services.accept_quote(make_quote("bybit", "BTC-USD", skewed, bid="97000", ask="97020"))
        services.accept_quote(make_quote("coingecko", "BTC-USD", "97020"))


def test_pricing_and_markup_are_set_by_post_and_patch_and_validated(
    client: Client, auth: dict[str, Any]
) -> None:
    created = body(
        client.post(
            "/api/v1/items",
            {"base": "sol", "quote": "usd", "pricing": "consensus", "markup_bps": 25.5},
            content_type="application/json",
            **auth,
        )
    )
    assert (created["pricing"], created["markup_bps"]) == ("consensus", D("25.5"))
    item_id = created["id"]
    patched = body(
        client.patch(
            f"/api/v1/items/{item_id}",
            {"pricing": None},
            content_type="application/json",
            **auth,
        )
    )
    assert (patched["pricing"], patched["markup_bps"]) == (None, D("25.5"))
    assert Item.objects.get(pk=item_id).pricing is None
    rounded = body(
        client.patch(
            f"/api/v1/items/{item_id}",
            {"markup_bps": "12.345"},
            content_type="application/json",
            **auth,
        )
    )
    assert rounded["markup_bps"] == D("12.34")  # hundredths of a bp, half to even
    for bad in ({"pricing": "median"}, {"markup_bps": 1001}, {"markup_bps": "abc"}):
        response = client.patch(
            f"/api/v1/items/{item_id}", bad, content_type="application/json", **auth
        )
        assert response.status_code == 422, (bad, response.content)
        assert json.loads(response.content)["detail"]


def test_latest_and_item_detail_carry_the_evidence_and_expand_the_sources(
    client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    item = Item.objects.get(code="BTC-USD")
    item_services.item_update(item=item, pricing="consensus", markup_bps=D("10"))
    quote_btc_usd(django_capture_on_commit_callbacks, skewed="101860.5")
    latest = body(client.get(f"/api/v1/items/{item.id}/rates/latest"))
    assert "sources" not in latest
    assert {k: latest[k] for k in ("provider", "value", "mode", "n_sources", "status")} == {
        "provider": "consensus",
        "value": D("97010"),
        "mode": "consensus",
        "n_sources": 2,
        "status": "live",
    }
    # bid/ask: the included sources' (Binance's; CoinGecko has none); buy/sell with 10 bp.
    assert (latest["bid"], latest["ask"], latest["spread_bps"]) == (
        D("96990"),
        D("97010"),
        D("2.06"),
    )
    assert (latest["buy"], latest["sell"]) == (D("97107.01"), D("96893.01"))
    assert latest["dispersion_bps"] == D("0.52")
    expanded = body(client.get(f"/api/v1/items/{item.id}/rates/latest?expand=sources"))
    assert [(s["provider"], s["excluded"], s["reason"]) for s in expanded["sources"]] == [
        ("binance", False, None),
        ("coingecko", False, None),
        ("bybit", True, "outlier"),
    ]
    assert all(s["age_s"] >= 0 for s in expanded["sources"])
    assert client.get(f"/api/v1/items/{item.id}/rates/latest?expand=all").status_code == 422


@pytest.mark.django_db(transaction=True)
def test_item_detail_expands_the_sources(
    client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    # transaction=True: the detail route closes its thread's connection after reading. An
    # earlier transactional test may have flushed the seeded pairs: make this one if so.
    item = Item.objects.get_or_create(base="BTC", quote="USD")[0]
    item_services.item_update(item=item, pricing="consensus")
    quote_btc_usd(django_capture_on_commit_callbacks, skewed="101860.5")
    detail = body(client.get(f"/api/v1/items/{item.id}?expand=sources"))
    assert detail["pricing"] == "consensus"
    assert [(s["provider"], s["excluded"]) for s in detail["latest"]["sources"]] == [
        ("binance", False),
        ("coingecko", False),
        ("bybit", True),
    ]
    plain = body(client.get(f"/api/v1/items/{item.id}"))
    assert "sources" not in plain["latest"]
    assert (plain["latest"]["mode"], plain["latest"]["n_sources"]) == ("consensus", 2)


@pytest.mark.usefixtures("loaded_snapshot")
def test_pair_rate_and_convert_carry_the_evidence_and_convert_takes_a_side(
    client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    item = Item.objects.get(code="BTC-USD")
    item_services.item_update(item=item, pricing="consensus", markup_bps=D("10"))
    quote_btc_usd(django_capture_on_commit_callbacks)
    snapshot.reset()
    snapshot.load()
    pair = body(client.get("/api/v1/rates/BTC/USD"))
    assert (pair["mode"], pair["n_sources"], pair["provider"]) == ("consensus", 3, "consensus")
    assert "sources" not in pair
    expanded = body(client.get("/api/v1/rates/BTC/USD?expand=sources"))
    assert [s["provider"] for s in expanded["sources"]] == ["binance", "bybit", "coingecko"]
    mid = body(client.get("/api/v1/convert?from=BTC&to=USD&amount=2"))
    assert (mid["side"], mid["rate"], mid["result"]) == ("mid", D("97010"), D("194020"))
    buy = body(client.get("/api/v1/convert?from=BTC&to=USD&amount=2&side=buy"))
    # ask: the median of 97010 and 97020, plus 10 bp
    assert (buy["side"], buy["rate"]) == ("buy", D("97112.015"))
    assert buy["result"] == D("194224.03")
    sell = body(
        client.post(
            "/api/v1/convert",
            {"from": "BTC", "to": "USD", "amount": "1", "side": "sell"},
            content_type="application/json",
        )
    )
    assert sell["rate"] == sell["sell"] == D("96898.005")  # (96990 + 97000) / 2 less 10 bp
    # The inverse of a tracked pair: bid and ask invert and swap.
    inverse = body(client.get("/api/v1/rates/USD/BTC"))
    assert inverse["bid"] < inverse["value"] < inverse["ask"]
    assert client.get("/api/v1/convert?from=BTC&to=USD&amount=1&side=best").status_code == 422
