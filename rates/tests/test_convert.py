"""`GET|POST /api/v1/convert`: exact decimal arithmetic, provenance, and clear 422s."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import AsyncClient, Client
from django.utils import timezone

from rates.emulator import EmulatorServer
from rates.snapshot import Course
from rates.tests.support import FakeClock, point_settings_at

pytestmark = pytest.mark.usefixtures("rate_settings", "fresh_board", "on_demand_clock")

BTC_RUB = Decimal("7200987.654321012345678901")


@pytest.fixture(autouse=True)
def btc_rub(tracked: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """BTC-RUB tracked, live from CoinGecko, as the snapshot shows it."""
    now = timezone.now()
    course = Course(
        direction="BTC-RUB",
        value=BTC_RUB,
        provider="coingecko",
        source_time=datetime(2026, 3, 14, tzinfo=UTC),
        checked_at=now - timedelta(seconds=1.5),
        status="live",
        derived=False,
        version=3,
    ).to_dict(now)
    tracked["BTC-RUB"] = course
    return course


def decoded(response: Any) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def post(client: Client, body: str) -> Any:
    return client.post("/api/v1/convert", data=body, content_type="application/json")


def test_it_converts_with_decimals_and_rounds_half_even_to_18_places(client: Client) -> None:
    response = client.get("/api/v1/convert?from=btc&to=RUB&amount=0.5")
    assert response.status_code == 200, response.content
    # 0.5 × 7200987.654321012345678901 = 3600493.8271605061728394505: the 19th place is a
    # 5 after an even digit, so half-even keeps ...450 (half-up would make it ...451).
    assert decoded(response) == {
        "from": "BTC",
        "to": "RUB",
        "amount": Decimal("0.5"),
        "rate": BTC_RUB,
        "result": Decimal("3600493.827160506172839450"),
        "provider": "coingecko",
        "source_time": "2026-03-14T00:00:00Z",
        "age_s": Decimal("1.5"),
        "derived": False,
        "stale": False,
        "status": "live",
        "route": [],
        "side": "mid",
        "mode": "priority",
        "n_sources": 1,
        "dispersion_bps": None,
        "bid": None,
        "ask": None,
        "spread_bps": None,
        "buy": BTC_RUB,
        "sell": BTC_RUB,
    }


def test_a_json_number_in_the_body_is_read_exactly_never_as_a_float(client: Client) -> None:
    # As a float, 0.123456789012345678 is 0.12345678901234568 and 9007199254740993 ...992.
    response = post(client, '{"from": "BTC", "to": "RUB", "amount": 0.123456789012345678}')
    assert response.status_code == 200, response.content
    body = decoded(response)
    assert body["amount"] == Decimal("0.123456789012345678")
    assert body["result"] == (Decimal("0.123456789012345678") * BTC_RUB).quantize(Decimal("1e-18"))
    assert '"amount":0.123456789012345678,' in response.content.decode()
    whole = decoded(post(client, '{"from": "BTC", "to": "RUB", "amount": 9007199254740993}'))
    assert whole["amount"] == 9007199254740993


def test_a_json_number_with_more_places_is_rounded_half_even_a_string_is_refused(
    client: Client,
) -> None:
    # A JSON number is a value (a float's binary tail, 1e-30): rounded once to 18 places, as the
    # OpenAPI says; the text form is held to 18 places exactly.
    body = decoded(post(client, '{"from": "BTC", "to": "RUB", "amount": 0.1234567890123456785}'))
    assert body["amount"] == Decimal("0.123456789012345678")
    tiny = decoded(post(client, '{"from": "BTC", "to": "RUB", "amount": 1e-30}'))
    assert (tiny["amount"], tiny["result"]) == (0, 0)
    text = post(client, '{"from": "BTC", "to": "RUB", "amount": "0.1234567890123456785"}')
    assert text.status_code == 422


def test_get_and_post_answer_the_same(client: Client) -> None:
    by_query = client.get("/api/v1/convert?from=BTC&to=RUB&amount=2.25")
    by_body = post(client, '{"from": "btc", "to": "rub", "amount": "2.25"}')
    assert by_query.status_code == by_body.status_code == 200
    assert decoded(by_query) == decoded(by_body)


def test_converting_an_asset_to_itself_is_rate_one(client: Client) -> None:
    body = decoded(client.get("/api/v1/convert?from=USDT&to=usdt&amount=12.5"))
    assert (body["rate"], body["result"], body["provider"]) == (1, Decimal("12.5"), None)
    assert (body["derived"], body["stale"], body["route"]) == (False, False, [])


def test_zero_converts_to_zero(client: Client) -> None:
    body = decoded(client.get("/api/v1/convert?from=BTC&to=RUB&amount=0"))
    assert (body["amount"], body["result"]) == (0, 0)


def test_the_largest_amount_multiplies_exactly(client: Client) -> None:
    amount = "99999999999999999999.999999999999999999"  # just under 10^20, 18 places
    body = decoded(client.get(f"/api/v1/convert?from=BTC&to=RUB&amount={amount}"))
    # (10^20 - 10^-18) × r = r·10^20 - r·10^-18
    #   = 720098765432101234567890099.999999999992799012|345678987654321099, cut at 18 places.
    assert body["result"] == Decimal("720098765432101234567890099.999999999992799012")


def test_a_stale_rate_says_so(client: Client, btc_rub: dict[str, Any]) -> None:
    btc_rub.update(stale=True, status="stale")
    body = decoded(client.get("/api/v1/convert?from=BTC&to=RUB&amount=1"))
    assert (body["stale"], body["status"], body["result"]) == (True, "stale", BTC_RUB)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("-1", "must not be negative"),
        ("abc", "expected a decimal number"),
        ("NaN", "expected a decimal number"),
        ("Infinity", "expected a decimal number"),
        ("1e20", "plain notation"),
        ("100000000000000000000", "less than 10^20"),
        ("1e999999999", "plain notation"),
        ("0.0000000000000000001", "at most 18 decimal places"),
        ("1_000", "expected a decimal number"),
        (" 0.5", "expected a decimal number"),  # no blanks: the OpenAPI pattern has none
        ("-0", "must not be negative"),
        ("0x10", "expected a decimal number"),
        ("١٢", "expected a decimal number"),  # Arabic-Indic digits, which Decimal() accepts
        ("1" * 65, "too long"),
    ],
)
def test_a_bad_amount_in_the_query_is_422_naming_it(
    client: Client, amount: str, message: str
) -> None:
    response = client.get("/api/v1/convert", {"from": "BTC", "to": "RUB", "amount": amount})
    assert response.status_code == 422, response.content
    errors = response.json()["errors"]
    assert [error["field"] for error in errors] == ["amount"]
    assert message in errors[0]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"from": "BTC", "to": "RUB", "amount": -0.5}', "amount"),
        ('{"from": "BTC", "to": "RUB", "amount": NaN}', "amount"),
        ('{"from": "BTC", "to": "RUB", "amount": Infinity}', "amount"),
        ('{"from": "BTC", "to": "RUB", "amount": 1e400}', "amount"),
        ('{"from": "BTC", "to": "RUB", "amount": true}', "amount"),
        ('{"from": "BTC", "to": "RUB", "amount": [1]}', "amount"),
        ('{"from": "BTC", "to": "RUB"}', "amount"),
        ('{"from": "B", "to": "RUB", "amount": 1}', "from"),
        ('{"from": 5, "to": "RUB", "amount": 1}', "from"),
        ('{"from": "BTC", "to": "R-B", "amount": 1}', "to"),
        ('{"from": "BTC", "to": "RUB", "amount": 1, "fee": 2}', "fee"),
    ],
)
def test_a_bad_body_is_422_naming_the_field(client: Client, body: str, field: str) -> None:
    response = post(client, body)
    assert response.status_code == 422, response.content
    assert field in [error["field"] for error in response.json()["errors"]]


def test_a_body_that_is_not_json_is_400(client: Client) -> None:
    response = post(client, '{"from": "BTC", ')
    assert response.status_code == 400
    assert response.json() == {"detail": "malformed JSON body"}


def test_missing_parameters_are_422(client: Client) -> None:
    response = client.get("/api/v1/convert?from=BTC")
    assert response.status_code == 422
    assert {error["field"] for error in response.json()["errors"]} == {"to", "amount"}


async def test_an_untracked_pair_converts_with_the_on_demand_rate_and_its_route(
    async_client: AsyncClient, emulator: EmulatorServer, settings: Any, on_demand_clock: FakeClock
) -> None:
    point_settings_at(settings, emulator)
    response = await async_client.get("/api/v1/convert?from=AUD&to=CAD&amount=100")
    assert response.status_code == 200, response.content
    body = decoded(response)
    assert body["rate"] == Decimal("0.911317185006585228183383")
    assert body["result"] == Decimal("91.131718500658522818")
    assert (body["provider"], body["derived"]) == ("cbr+cbr", True)
    assert [leg["pair"] for leg in body["route"]] == ["AUD-RUB", "CAD-RUB"]


async def test_a_pair_nobody_prices_is_404(
    async_client: AsyncClient, emulator: EmulatorServer, settings: Any
) -> None:
    point_settings_at(settings, emulator)
    settings.KURS_PROVIDERS = ["cbr"]
    response = await async_client.get("/api/v1/convert?from=BTC&to=ETH&amount=1")
    assert response.status_code == 404
    assert "BTC-ETH" in response.json()["detail"]


def test_the_openapi_schema_declares_both_methods(client: Client) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    for method, own in (("get", {"304"}), ("post", {"400"})):
        answers = spec["paths"]["/api/v1/convert"][method]["responses"]
        assert set(answers) == {"200", "404", "422", "429", "503"} | own
        schema = answers["200"]["content"]["application/json"]["schema"]
        # The answer now, or at an instant (`at`: docs/api.md#point-in-time).
        assert schema["anyOf"] == [
            {"$ref": "#/components/schemas/ConvertOut"},
            {"$ref": "#/components/schemas/ConvertAtOut"},
        ]
    out = spec["components"]["schemas"]["ConvertOut"]["properties"]
    assert {"from", "to", "amount", "rate", "result", "provider", "source_time"} <= set(out)
    assert out["result"]["type"] == "number"
    params = {p["name"] for p in spec["paths"]["/api/v1/convert"]["get"]["parameters"]}
    assert params == {"from", "to", "amount", "side", "at", "expand"}
