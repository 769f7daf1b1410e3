"""The rates endpoints, success and error paths (docs/api.md). Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from unittest.mock import ANY

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient, Client
from django.utils import timezone

from items import services as item_services
from items.models import Item
from rates import selectors
from rates.emulator import EmulatorServer
from rates.models import CurrentRate, Rate
from rates.tests.support import point_settings_at

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("rate_settings", "fresh_board")]

DAY = datetime(2026, 3, 14, tzinfo=UTC)


@pytest.fixture
def btc() -> Item:
    return Item.objects.get_or_create(base="BTC", quote="USD")[0]


@pytest.fixture
def history(btc: Item) -> list[Rate]:
    """Five rates: three on DAY (binance, bybit, binance), one the day before, one after."""
    rows = []
    for offset, provider, value in [
        (timedelta(hours=-2), "binance", "1.1"),
        (timedelta(hours=1), "binance", "54000.123456789012345678"),
        (timedelta(hours=2), "bybit", "54001"),
        (timedelta(hours=23, minutes=59), "binance", "54002"),
        (timedelta(days=1, hours=1), "binance", "54003"),
    ]:
        moment = DAY + offset
        rows.append(
            Rate.objects.create(
                item=btc,
                provider=provider,
                value=Decimal(value),
                bid=Decimal(value) - 1,
                source_time=moment - timedelta(seconds=1),
                received_at=moment,
            )
        )
    return rows


def values(response: Any) -> list[str]:
    body = json.loads(response.content, parse_float=Decimal)
    return [str(rate["value"]) for rate in body["items"]]


def assert_422_naming(response: Any, field: str) -> None:
    assert response.status_code == 422, response.content
    body = response.json()
    assert field in body["detail"]
    assert any(error["field"] == field for error in body["errors"])


def test_it_lists_an_items_rates_newest_first_with_the_count(
    client: Client, btc: Item, history: list[Rate]
) -> None:
    response = client.get(f"/api/v1/items/{btc.id}/rates?limit=2")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 5
    assert values(response) == ["54003", "54002"]
    assert set(body["items"][0]) == {
        "provider",
        "value",
        "bid",
        "ask",
        "source_time",
        "received_at",
    }
    assert body["items"][0]["received_at"] == "2026-03-15T01:00:00Z"
    assert body["items"][0]["ask"] is None


def test_rate_values_keep_every_digit_in_json(
    client: Client, btc: Item, history: list[Rate]
) -> None:
    response = client.get(f"/api/v1/items/{btc.id}/rates?date=2026-03-14&provider=binance")
    assert b'"value":54000.123456789012345678' in response.content


def test_it_filters_by_utc_day_provider_since_and_until(
    client: Client, btc: Item, history: list[Rate]
) -> None:
    path = f"/api/v1/items/{btc.id}/rates"
    assert values(client.get(f"{path}?date=2026-03-14")) == [
        "54002",
        "54001",
        "54000.123456789012345678",
    ]
    assert values(client.get(f"{path}?date=2026-03-14&provider=bybit")) == ["54001"]
    since, until = "2026-03-14T01:00:00Z", "2026-03-14T23:59:00"  # no offset: UTC
    assert values(client.get(f"{path}?since={since}&until={until}")) == [
        "54001",
        "54000.123456789012345678",
    ]
    assert client.get(f"{path}?provider=coingecko").json() == {"items": [], "count": 0}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("date=2026-02-30", "date"),
        ("date=14.03.2026", "date"),
        ("since=2026-03-14T10:00:00Z&until=2026-03-14T09:00:00Z", "until"),
        ("provider=" + "x" * 33, "provider"),
        ("since=0001-01-01T00:00:00%2B01:00", "since"),  # before year 1 in UTC
        ("until=9999-12-31T23:59:59-01:00", "until"),  # after year 9999 in UTC
        ("date=9999-12-31", "date"),  # the day would end in year 10000
        # A number is no date-time (pydantic alone reads it as a Unix timestamp).
        ("since=0.5", "since"),
        ("until=1700000000", "until"),
        ("since=1e9", "since"),
        ("date=0", "date"),
        ("date=20260314", "date"),
    ],
)
def test_every_bad_parameter_is_a_422_naming_it(
    client: Client, btc: Item, query: str, field: str
) -> None:
    assert_422_naming(client.get(f"/api/v1/items/{btc.id}/rates?{query}"), field)


@pytest.mark.parametrize("suffix", ["rates", "rates/latest"])
def test_an_unknown_item_is_a_404(client: Client, suffix: str) -> None:
    response = client.get(f"/api/v1/items/999999/{suffix}")
    assert response.status_code == 404
    assert response.json()["detail"] == "item 999999 not found"


def test_latest_is_the_current_rate_of_the_read_model(
    client: Client, btc: Item, history: list[Rate]
) -> None:
    checked = timezone.now() - timedelta(seconds=5)
    CurrentRate.objects.create(
        item=btc,
        provider="bybit",
        value=Decimal("54001.5"),
        source_time=checked - timedelta(seconds=60),
        checked_at=checked,
        received_at=checked - timedelta(seconds=59),
        status="failover",
        version=12,
    )
    response = client.get(f"/api/v1/items/{btc.id}/rates/latest")
    assert response.status_code == 200
    body = response.json()
    # Not the newest history row (binance 54003): who serves is the owner's decision.
    assert (body["provider"], body["value"], body["status"]) == ("bybit", 54001.5, "failover")
    assert body["version"] == 12
    assert body["derived"] is False
    assert body["route"] == []
    assert 5 <= body["age_s"] < 10  # seconds since the last confirmation
    assert client.get(f"/api/v1/items/{btc.id}").json()["latest"] == {**body, "age_s": ANY}


def test_latest_turns_stale_when_read_after_the_freshness_window(client: Client, btc: Item) -> None:
    checked = timezone.now() - timedelta(seconds=31)  # KURS_STALE_AFTER is 30 s
    CurrentRate.objects.create(
        item=btc,
        provider="binance",
        value=Decimal(100),
        source_time=checked,
        checked_at=checked,
        received_at=checked,
        status="live",
        version=1,
    )
    assert client.get(f"/api/v1/items/{btc.id}/rates/latest").json()["status"] == "stale"


def test_latest_is_a_404_before_the_first_rate(client: Client, btc: Item) -> None:
    response = client.get(f"/api/v1/items/{btc.id}/rates/latest")
    assert response.status_code == 404
    assert "no rate yet" in response.json()["detail"]


def test_providers_lists_each_configured_provider_in_priority_order(client: Client) -> None:
    response = client.get("/api/v1/providers")
    assert response.status_code == 200
    assert response.json() == [
        {
            "name": name,
            "priority": priority,
            "state": "closed",
            "last_success": None,
            "last_error": None,
            "last_error_at": None,
            "errors_5m": 0,
            "streaming": False,
            "excluded": None,
        }
        for priority, name in enumerate(["binance", "bybit", "coingecko", "cbr"])
    ]


def test_running_a_task_needs_an_api_key(client: Client) -> None:
    response = client.post("/api/v1/tasks/run")
    assert response.status_code == 401
    assert response.json()["detail"]


@pytest.mark.django_db(transaction=True)
async def test_running_a_task_fetches_now_and_reports_each_provider(
    async_client: AsyncClient, emulator: EmulatorServer, settings: Any
) -> None:
    point_settings_at(settings, emulator)
    # A REST round is cut off at half a poll (2.5 s by default), which a loaded machine's round
    # to the emulator in this same process may outlive: rounds get the ceiling instead
    # (`MAX_ROUND_SECONDS`), so this test is about the report, not about the machine's speed.
    settings.KURS_POLL_INTERVAL = 60.0
    emulator.set_fault("cbr", "down")
    _, key = await sync_to_async(item_services.api_key_create)(name="tests")
    await Item.objects.aget_or_create(base="BTC", quote="USD")
    await Item.objects.aget_or_create(base="BTC", quote="RUB")  # cbr is asked for its USD-RUB leg
    try:
        response = await async_client.post("/api/v1/tasks/run", headers={"X-API-Key": key})
        assert response.status_code == 200, response.content
        body = response.json()
        assert set(body) == {"stored", "providers", "duration_ms"}
        assert body["providers"]["binance"] == "ok", body
        assert body["providers"]["cbr"].startswith("error: HTTP 503"), body
        assert body["stored"] >= 3, body  # BTC-USD from binance, bybit and coingecko at least
        assert await Rate.objects.filter(item__code="BTC-USD").acount() >= 3
        assert await Rate.objects.acount() == body["stored"]
        providers = {p["name"]: p for p in (await async_client.get("/api/v1/providers")).json()}
        assert providers["binance"]["last_success"] is not None
        assert providers["binance"]["streaming"] is False
        assert providers["cbr"]["errors_5m"] == 1
        assert providers["cbr"]["last_error"].startswith("HTTP 503")
        # The error's time, so that a client can tell an old error from a current fault.
        failed_at = datetime.fromisoformat(providers["cbr"]["last_error_at"])
        assert abs((datetime.now(UTC) - failed_at).total_seconds()) < 60
        assert providers["binance"]["last_error_at"] is None
    finally:
        await sync_to_async(connections.close_all)()


@pytest.mark.parametrize("spelled", ["binance+cbr", "binance%2Bcbr"])
def test_the_provider_filter_finds_cross_rates_however_the_plus_is_sent(
    client: Client, spelled: str
) -> None:
    btc_rub = Item.objects.get_or_create(base="BTC", quote="RUB")[0]
    Rate.objects.create(
        item=btc_rub,
        provider="binance+cbr",
        value=Decimal("7200000.5"),
        source_time=DAY,
        received_at=DAY,
        derived=True,
    )
    response = client.get(f"/api/v1/items/{btc_rub.id}/rates?provider={spelled}")
    assert response.json()["count"] == 1


@pytest.mark.parametrize("provider", ["a%00b", "binance%0A", "<script>"])
def test_a_malformed_provider_filter_is_a_422(client: Client, btc: Item, provider: str) -> None:
    response = client.get(f"/api/v1/items/{btc.id}/rates?provider={provider}")
    assert response.status_code == 422
    assert "provider" in response.json()["detail"]


def test_the_history_count_stops_at_its_cap(
    client: Client, btc: Item, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selectors, "COUNT_CAP", 3)
    now = timezone.now()
    Rate.objects.bulk_create(
        Rate(item=btc, provider="binance", value=Decimal(n), source_time=now, received_at=now)
        for n in range(1, 6)
    )
    body = client.get(f"/api/v1/items/{btc.id}/rates?limit=2").json()
    assert (len(body["items"]), body["count"]) == (2, 3)
    monkeypatch.setattr(selectors, "COUNT_CAP", 10)
    assert client.get(f"/api/v1/items/{btc.id}/rates?limit=2").json()["count"] == 5


@pytest.mark.parametrize(
    "query", ["since=0.5", "until=1700000000", "provider=%1D", "provider=a%00b"]
)
def test_candles_refuse_numbers_as_times_and_control_characters(
    client: Client, btc: Item, query: str
) -> None:
    # A control character in `provider` went out in the Kurs-Provider header: the server
    # dropped the connection instead of answering.
    response = client.get(f"/api/v1/items/{btc.id}/candles?{query}")
    assert_422_naming(response, query.split("=")[0])


def _schema(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return spec["components"]["schemas"][name]["properties"]


def test_the_openapi_declares_rate_values_as_numbers_as_they_are_sent(
    client: Client, btc: Item, history: list[Rate]
) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    for name in ("RateOut", "CurrentRateOut"):
        fields = _schema(spec, name)
        assert fields["value"] == {"title": "Value", "type": "number"}
        for optional in ("bid", "ask"):
            assert fields[optional]["anyOf"] == [{"type": "number"}, {"type": "null"}]
    for name, numbers in (
        ("CandleOut", ("open", "high", "low", "close")),
        ("CourseOut", ("value",)),
    ):
        assert all(_schema(spec, name)[field]["type"] == "number" for field in numbers)
    assert _schema(spec, "PairRateOut")["value"]["type"] == "number"
    # ... and the wire says the same: JSON numbers, not strings.
    row = client.get(f"/api/v1/items/{btc.id}/rates").json()["items"][0]
    assert all(isinstance(row[field], int | float) for field in ("value", "bid"))


# Each route and the errors it gives (docs/api.md#errors): 401 on writes, 404 for an unknown item,
# 409 for a pair that exists, 422 for bad input, 429 where a limit applies, 400 for a body that is
# no JSON.
DOCUMENTED = [
    ("get", "/api/v1/items", {"200", "422", "429"}),
    ("post", "/api/v1/items", {"201", "400", "401", "409", "422"}),
    ("get", "/api/v1/items/{item_id}", {"200", "404", "422", "429"}),
    ("patch", "/api/v1/items/{item_id}", {"200", "400", "401", "404", "422"}),
    ("delete", "/api/v1/items/{item_id}", {"204", "401", "404"}),
    ("get", "/api/v1/items/{item_id}/rates", {"200", "404", "422", "429"}),
    ("get", "/api/v1/items/{item_id}/rates/latest", {"200", "304", "404", "422", "429"}),
    ("get", "/api/v1/courses", {"200", "304", "422", "429", "503"}),
    ("get", "/api/v1/providers", {"200", "429"}),
    ("post", "/api/v1/tasks/run", {"200", "401", "429", "503"}),
    ("get", "/api/v1/health", {"200", "429", "503"}),
]


@pytest.mark.parametrize(("method", "path", "codes"), DOCUMENTED)
def test_the_openapi_documents_every_answer_of_a_route(
    client: Client, method: str, path: str, codes: set[str]
) -> None:
    answers = client.get("/api/v1/openapi.json").json()["paths"][path][method]["responses"]
    assert set(answers) == codes
    for code in codes & {"400", "401", "404", "409", "422", "429"}:
        schema = answers[code]["content"]["application/json"]["schema"]["$ref"]
        assert schema.endswith("ValidationErrorOut" if code == "422" else "ErrorOut")


def test_the_openapi_states_the_input_constraints(client: Client) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    item_in = _schema(spec, "ItemIn")
    assert item_in["base"]["pattern"] == item_in["quote"]["pattern"] == "^ *[A-Za-z0-9]{2,12} *$"
    assert item_in["name"]["maxLength"] == 100
    assert "pattern" in item_in["name"]
    history = {
        p["name"]: p for p in spec["paths"]["/api/v1/items/{item_id}/rates"]["get"]["parameters"]
    }
    limit = history["limit"]["schema"]["anyOf"][0]
    assert (limit["minimum"], limit["maximum"]) == (1, 500)
    since = history["since"]["schema"]["anyOf"][0]["anyOf"][0]
    assert since == {"format": "date-time", "type": "string"}
    # docs/api.md#query-parameters: an empty query parameter means absent, and the schema says so.
    assert history["since"]["schema"]["anyOf"][1]["maxLength"] == 0
