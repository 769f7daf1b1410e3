"""Sustained exclusions (docs/rates.md#consensus-pricing): the pure rule on an injected clock,
then the owner's path (quotes through `services.accept_quote`, a skewed provider, the status the
owner saves) as a web process's `/providers` and health show it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client import REGISTRY

from items.models import Item
from rates import exclusions, provider_health, services, shards
from rates.board import QuoteBoard
from rates.exclusions import Exclusion
from rates.tests.support import make_quote

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.get_current_timezone())
MINUTE = timedelta(minutes=1)


# --- The rule ----------------------------------------------------------------------------------
def test_an_exclusion_keeps_its_start_while_any_pair_excludes_and_ends_when_none_does() -> None:
    assert exclusions.track(None, [], now=T0) is None
    started = exclusions.track(None, ["BTC-USD"], now=T0)
    assert started == Exclusion(since=T0, pairs=("BTC-USD",))
    # Another pair joins, then the first one agrees again: one uninterrupted exclusion.
    wider = exclusions.track(started, ["ETH-USD", "BTC-USD"], now=T0 + MINUTE)
    assert wider == Exclusion(since=T0, pairs=("BTC-USD", "ETH-USD"))
    narrower = exclusions.track(wider, ["ETH-USD"], now=T0 + 2 * MINUTE)
    assert narrower == Exclusion(since=T0, pairs=("ETH-USD",))
    # Included everywhere: it ends; excluded again later, it starts afresh.
    assert exclusions.track(narrower, [], now=T0 + 3 * MINUTE) is None
    again = exclusions.track(None, ["BTC-USD"], now=T0 + 4 * MINUTE)
    assert again == Exclusion(since=T0 + 4 * MINUTE, pairs=("BTC-USD",))


def test_pairs_excluding_providers_become_providers_excluded_from_pairs() -> None:
    assert exclusions.by_provider(
        {"BTC-USD": {"bybit", "cbr"}, "ETH-USD": {"bybit"}, "SOL-USD": set()}
    ) == {"bybit": ("BTC-USD", "ETH-USD"), "cbr": ("BTC-USD",)}


def test_an_exclusion_is_overdue_only_past_the_threshold() -> None:
    after = exclusions.DEGRADED_AFTER
    assert not exclusions.overdue(T0, now=T0 + after)
    assert exclusions.overdue(T0, now=T0 + after + timedelta(seconds=1))
    assert exclusions.overdue(T0, now=T0 + 2 * MINUTE, after=MINUTE)


# --- The owner's path, seen from the web -------------------------------------------------------
def excluded_seconds(provider: str) -> float | None:
    return REGISTRY.get_sample_value("kurs_provider_excluded_seconds", {"provider": provider})


def accept(quote: Any, capture: Any) -> None:
    with capture(execute=True):
        services.accept_quote(quote)


def bybit_goes_off(capture: Any, pair: str = "BTC-USD", price: int = 97000) -> None:
    """`pair` by consensus of three providers, then Bybit 5 % off: excluded."""
    base, quote = pair.split("-")
    Item.objects.update_or_create(
        base=base, quote=quote, defaults={"is_active": True, "pricing": "consensus"}
    )
    services.get_board().forget_items()  # read with the new item's pricing
    for n, provider in enumerate(("binance", "bybit", "coingecko")):
        accept(make_quote(provider, pair, f"{price * (1 + n / 10_000):.2f}"), capture)
    accept(make_quote("bybit", pair, f"{price * 1.05:.2f}"), capture)
    current = services.get_board().get_current(pair)
    assert current is not None
    assert current.excluded_providers == {"bybit"}


def web_view(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a web process answers: `/providers` by name, and health's providers component."""
    providers = client.get("/api/v1/providers")
    assert providers.status_code == 200
    health = client.get("/api/v1/health")
    assert health.status_code == 200
    by_name = {provider["name"]: provider for provider in providers.json()}
    return by_name, health.json()["components"]["providers"]


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_provider_excluded_for_a_while_shows_in_providers_and_health_stays_ok(
    client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    bybit_goes_off(django_capture_on_commit_callbacks)
    started = timezone.now() - 4 * MINUTE  # the owner's tick that first saw it, 4 minutes ago
    provider_health.flush_statuses(now=started)
    assert excluded_seconds("bybit") == 0
    provider_health.flush_statuses(now=started + 90 * timedelta(seconds=1))
    assert excluded_seconds("bybit") == 90
    assert excluded_seconds("binance") == 0

    providers, health = web_view(client)
    assert providers["bybit"]["excluded"]["pairs"] == ["BTC-USD"]
    assert datetime.fromisoformat(providers["bybit"]["excluded"]["since"]) == started
    assert [providers[name]["excluded"] for name in ("binance", "coingecko", "cbr")] == [None] * 3
    # Four minutes is a source catching up, not a fault.
    assert health["status"] == "ok", health
    assert "detail" not in health


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_provider_excluded_past_the_threshold_degrades_health_until_it_agrees_again(
    client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    bybit_goes_off(django_capture_on_commit_callbacks)
    started = timezone.now() - 6 * MINUTE
    provider_health.flush_statuses(now=started)
    # Its next quotes stay off: still one uninterrupted exclusion.
    accept(make_quote("bybit", "BTC-USD", "101861"), django_capture_on_commit_callbacks)
    provider_health.flush_statuses(now=started + 5 * MINUTE)
    assert excluded_seconds("bybit") == 300

    providers, health = web_view(client)
    assert datetime.fromisoformat(providers["bybit"]["excluded"]["since"]) == started
    assert health["status"] == "degraded"
    assert health["detail"] == "excluded by consensus for over 5 min: bybit (BTC-USD)"
    assert health["states"]["bybit"] == "closed"  # its circuit is fine: its prices are not

    # Bybit agrees again: the next tick clears it everywhere.
    accept(make_quote("bybit", "BTC-USD", "97015"), django_capture_on_commit_callbacks)
    provider_health.flush_statuses()
    assert excluded_seconds("bybit") == 0
    providers, health = web_view(client)
    assert providers["bybit"]["excluded"] is None
    assert health["status"] == "ok", health


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings", "fresh_board")
def test_a_stale_pair_excludes_nobody(
    client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    bybit_goes_off(django_capture_on_commit_callbacks)
    provider_health.flush_statuses(now=timezone.now() - 6 * MINUTE)
    # Every source ages out: the stale version keeps the last value and rests on no source.
    services.reevaluate(now=timezone.now() + timedelta(hours=1))
    current = services.get_board().get_current("BTC-USD")
    assert current is not None
    assert current.status == "stale"
    provider_health.flush_statuses()
    providers, health = web_view(client)
    assert providers["bybit"]["excluded"] is None
    assert "excluded" not in health.get("detail", "")


def as_owner_of(board: QuoteBoard, owned: frozenset[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """This process plays the owner of `owned` (of two shards), with its own provider monitors,
    as a `run_fetch --watch` process of its own would have (`rates.shards.own`)."""
    board.owns = lambda code: shards.shard_of(code, 2) in owned
    board.duty = lambda: shards.GLOBAL_SHARD in owned
    board.shards = owned
    monkeypatch.setattr(provider_health, "_monitors", {})


@pytest.mark.django_db
@pytest.mark.usefixtures("rate_settings")
def test_every_shard_s_owner_saves_its_pairs_exclusions_and_providers_shows_them_merged(
    client: Client,
    django_capture_on_commit_callbacks: Any,
    fresh_board: QuoteBoard,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings.KURS_OWNER_SHARDS = 2
    assert (shards.shard_of("BTC-USD", 2), shards.shard_of("ETH-USD", 2)) == (0, 1)
    bybit_goes_off(django_capture_on_commit_callbacks, "BTC-USD", 97000)
    bybit_goes_off(django_capture_on_commit_callbacks, "ETH-USD", 3000)
    now = timezone.now()
    # Shard 1's owner (no global duties) saw ETH-USD exclude Bybit 6 minutes ago, shard 0's
    # owner BTC-USD 2 minutes ago.
    as_owner_of(fresh_board, frozenset({1}), monkeypatch)
    provider_health.flush_statuses(now=now - 6 * MINUTE)
    as_owner_of(fresh_board, frozenset({0}), monkeypatch)
    provider_health.flush_statuses(now=now - 2 * MINUTE)

    providers, health = web_view(client)
    assert providers["bybit"]["excluded"]["pairs"] == ["BTC-USD", "ETH-USD"]
    assert datetime.fromisoformat(providers["bybit"]["excluded"]["since"]) == now - 6 * MINUTE
    assert providers["binance"]["excluded"] is None
    assert health["status"] == "degraded"
    assert "bybit" in health["detail"]

    # Bybit agrees on ETH-USD again: shard 1's owner clears its part, shard 0's stays.
    as_owner_of(fresh_board, frozenset({1}), monkeypatch)
    accept(make_quote("bybit", "ETH-USD", "3005"), django_capture_on_commit_callbacks)
    provider_health.flush_statuses(now=now)
    providers, health = web_view(client)
    assert providers["bybit"]["excluded"]["pairs"] == ["BTC-USD"]
    assert datetime.fromisoformat(providers["bybit"]["excluded"]["since"]) == now - 2 * MINUTE
    assert health["status"] == "ok", health
