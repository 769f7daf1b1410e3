from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest

from rates.emulator import EmulatorServer
from rates.providers import CBRProvider, Pair, ProviderHTTPError, ProviderMalformed
from rates.providers.base import decode_json
from rates.providers.cbr import parse_daily
from rates.tests.conftest_emulator import make_provider

# Verbatim from shared/reference/provider-formats.md section 3 (a real daily_json.js capture).
SAMPLE = """{
  "Date": "2024-05-16T11:30:00+03:00",
  "PreviousDate": "2024-05-15T11:30:00+03:00",
  "PreviousURL": "//www.cbr-xml-daily.ru/archive/2024/05/15/daily_json.js",
  "Timestamp": "2024-05-15T20:00:00+03:00",
  "Valute": {
    "USD": {"ID": "R01235", "NumCode": "840", "CharCode": "USD", "Nominal": 1,
            "Name": "Доллар США", "Value": 91.2573, "Previous": 91.3591},
    "EUR": { "ID": "R01239", "NumCode": "978", "CharCode": "EUR", "Nominal": 1,
             "Name": "Евро", "Value": 98.8267, "Previous": 98.6682 },
    "AMD": { "ID": "R01060", "NumCode": "051", "CharCode": "AMD", "Nominal": 100,
             "Name": "Армянских драмов", "Value": 23.5491, "Previous": 23.565 }
  }
}"""


def cbr(emulator: EmulatorServer, client: httpx.AsyncClient) -> CBRProvider:
    provider = make_provider("cbr", emulator, client)
    assert isinstance(provider, CBRProvider)
    return provider


def test_it_divides_by_nominal_exactly() -> None:
    body = decode_json(SAMPLE.encode(), what="body")
    wanted = [(Pair("USD", "RUB"), "USD"), (Pair("AMD", "RUB"), "AMD"), (Pair("CAD", "RUB"), "CAD")]
    usd, amd = parse_daily(body, wanted)
    assert usd.value == Decimal("91.2573")
    assert amd.value == Decimal("0.235491")
    assert str(amd.value) == "0.235491"


def test_it_dates_rates_by_publication_not_by_the_future_effective_day() -> None:
    body = decode_json(SAMPLE.encode(), what="body")
    (usd,) = parse_daily(body, [(Pair("USD", "RUB"), "USD")])
    # Timestamp 2024-05-15 20:00 MSK, before Date 2024-05-16 11:30 MSK (when the rates apply).
    assert usd.source_time == datetime(2024, 5, 15, 17, 0, tzinfo=UTC)


@pytest.mark.parametrize("body", ['{"Valute": {}}', '{"Date": "x", "Valute": []}', "[]"])
def test_it_rejects_a_misshapen_file(body: str) -> None:
    with pytest.raises(ProviderMalformed):
        parse_daily(decode_json(body, what="body"), [])


def test_its_freshness_spans_a_weekend() -> None:
    assert CBRProvider.freshness is not None
    assert CBRProvider.freshness >= 3 * 86400


async def test_it_quotes_fiat_against_rub_only(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    provider = cbr(emulator, emulator_client)
    assert provider.supports(Pair("AUD", "RUB"))
    assert not provider.supports(Pair("RUB", "USD"))
    assert not provider.supports(Pair("BTC", "RUB"))
    pairs = [Pair(code, "RUB") for code in ("USD", "EUR", "AUD", "CAD", "JPY", "KZT")]
    quotes = {q.pair: q for q in await provider.fetch(pairs)}
    assert quotes["USD-RUB"].value == Decimal("80.0000")
    assert quotes["AUD-RUB"].value == Decimal("52.3107")
    assert quotes["CAD-RUB"].value == Decimal("57.4012")
    assert quotes["JPY-RUB"].value == Decimal("0.528010")  # 52.8010 per 100 yen
    assert quotes["KZT-RUB"].value == Decimal("0.156789")
    source_time = quotes["USD-RUB"].source_time
    assert source_time <= datetime.now(UTC)
    assert source_time.tzinfo is UTC


async def test_it_sees_a_price_set_on_the_emulator(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    response = await emulator_client.post(
        f"{emulator.base_url}/_control/cbr/price", json={"symbol": "KZT", "price": "16.1234"}
    )
    assert response.status_code == 200
    (quote,) = await cbr(emulator, emulator_client).fetch([Pair("KZT", "RUB")])
    assert quote.value == Decimal("0.161234")


async def test_it_reports_the_mirror_down(
    emulator: EmulatorServer, emulator_client: httpx.AsyncClient
) -> None:
    emulator.set_fault("cbr", "down", status=502)
    with pytest.raises(ProviderHTTPError, match="502"):
        await cbr(emulator, emulator_client).fetch([Pair("USD", "RUB")])
