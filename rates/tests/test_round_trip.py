"""Rates derived through one anchor agree with themselves: A→B × B→A is 1 within the stated
precision (18 decimal places) on `/rates` and `/convert` (docs/api.md#get-apiv1ratesbasequote):
a tracked pair and its inverse, and an on-demand cross rate and its reverse, from the emulator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

import pytest
from django.test import AsyncClient
from django.utils import timezone

from rates.emulator import EmulatorServer
from rates.snapshot import Course
from rates.tests.support import point_settings_at

pytestmark = pytest.mark.usefixtures("rate_settings", "fresh_board", "on_demand_clock")

STEP = Decimal("1E-18")
# A large tracked value, whose inverse is small: 18 decimal places of it are 11 digits.
BTC_RUB = Decimal("7200987.654321012345678901")


@pytest.fixture(autouse=True)
def btc_rub(tracked: dict[str, dict[str, Any]]) -> None:
    now = timezone.now()
    tracked["BTC-RUB"] = Course(
        direction="BTC-RUB",
        value=BTC_RUB,
        provider="coingecko",
        source_time=datetime(2026, 3, 14, tzinfo=UTC),
        checked_at=now - timedelta(seconds=1),
        status="live",
        derived=False,
        version=1,
    ).to_dict(now)


def product(one: Decimal, other: Decimal) -> Decimal:
    with localcontext() as context:
        context.prec = 80
        return (one * other).quantize(STEP)


async def rate(client: AsyncClient, base: str, quote: str) -> Decimal:
    response = await client.get(f"/api/v1/rates/{base}/{quote}")
    assert response.status_code == 200, response.content
    value: Decimal = json.loads(response.content, parse_float=Decimal)["value"]
    return value


async def convert_rate(client: AsyncClient, source: str, target: str) -> Decimal:
    response = await client.get(f"/api/v1/convert?from={source}&to={target}&amount=1")
    assert response.status_code == 200, response.content
    value: Decimal = json.loads(response.content, parse_float=Decimal)["rate"]
    return value


@pytest.mark.parametrize(("base", "quote"), [("BTC", "RUB"), ("AUD", "CAD"), ("JPY", "AMD")])
async def test_a_pair_and_its_reverse_multiply_to_one_on_rates_and_convert(
    async_client: AsyncClient, emulator: EmulatorServer, settings: Any, base: str, quote: str
) -> None:
    point_settings_at(settings, emulator)
    there, back = await rate(async_client, base, quote), await rate(async_client, quote, base)
    assert product(there, back) == 1, (there, back)
    there = await convert_rate(async_client, base, quote)
    back = await convert_rate(async_client, quote, base)
    assert product(there, back) == 1, (there, back)


async def test_the_inverse_keeps_its_significant_digits(async_client: AsyncClient) -> None:
    inverse = await rate(async_client, "RUB", "BTC")
    with localcontext() as context:
        context.prec = 80
        exact = 1 / BTC_RUB
    assert abs(inverse / exact - 1) < Decimal("1E-23")  # 24 digits, not 11
