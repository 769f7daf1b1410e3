"""The admin's item list shows each pair's current rate, provider and status (stale by the same
rule as every reader) and links to a read-only history of the pair's rates."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from items.models import Item
from rates.models import Rate
from rates.tests.support import store_current

pytestmark = pytest.mark.django_db


def row_of(html: str, code: str) -> str:
    """The changelist's table row of the item `code`."""
    rows = re.findall(r"<tr>.*?</tr>", html, re.DOTALL)
    [row] = [row for row in rows if f">{code}</a>" in row]
    return row


def cells(row: str) -> dict[str, str]:
    """A changelist row's cells by column, as text."""
    found = re.findall(r'<td class="field-(\w+)">(.*?)</td>', row)
    return {name: re.sub(r"<[^>]+>", "", text).strip() for name, text in found}


def rate_columns(html: str, code: str) -> list[str]:
    row = cells(row_of(html, code))
    return [row["rate"], row["provider"], row["status"], row["history"]]


def test_the_item_list_shows_rate_provider_status_and_a_history_link(admin_client: Client) -> None:
    btc = Item.objects.get(code="BTC-USD")
    eth = Item.objects.get(code="ETH-USD")
    store_current(btc, "binance", "91234.500000012")
    store_current(eth, "bybit", "3012.5", status="failover", checked_ago=3600)

    response = admin_client.get("/admin/items/item/")
    assert response.status_code == 200
    html = response.content.decode()
    headers = re.findall(r'<th scope="col" class="[^"]*column-(\w+)', html)
    assert headers == ["code", "name", "is_active", "rate", "provider", "status", "history"]

    assert rate_columns(html, "BTC-USD") == ["91,234.500000012", "binance", "live", "rates"]
    # Written as failover an hour ago: stale now, as /courses and the dashboard say.
    assert rate_columns(html, "ETH-USD") == ["3,012.5", "bybit", "stale", "rates"]
    assert rate_columns(html, "BTC-RUB") == ["—", "—", "no rate yet", "rates"]
    assert f'href="/admin/rates/rate/?item__id__exact={btc.id}"' in row_of(html, "BTC-USD")


def test_an_items_history_is_listed_newest_first_and_read_only(admin_client: Client) -> None:
    btc = Item.objects.get(code="BTC-USD")
    eth = Item.objects.get(code="ETH-USD")
    now = timezone.now()
    for n, value in enumerate(["90000.1", "90100.2", "90200.3"]):
        Rate.objects.create(
            item=btc,
            provider="binance",
            value=Decimal(value),
            source_time=now,
            received_at=now - timedelta(minutes=3 - n),
        )
    Rate.objects.create(
        item=eth, provider="bybit", value=Decimal("3000"), source_time=now, received_at=now
    )

    response = admin_client.get(f"/admin/rates/rate/?item__id__exact={btc.id}")
    assert response.status_code == 200
    html = response.content.decode()
    values = re.findall(r'<td class="field-rate">([^<]*)</td>', html)
    assert values == ["90,200.3", "90,100.2", "90,000.1"]
    # Read-only: no add button, no delete action, rows open a view page, not a form.
    assert "/admin/rates/rate/add/" not in html
    assert 'value="delete_selected"' not in html
    first = Rate.objects.filter(item=btc).order_by("-received_at").first()
    assert first is not None
    page = admin_client.get(f"/admin/rates/rate/{first.id}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.post(f"/admin/rates/rate/{first.id}/delete/").status_code == 403
    assert Rate.objects.filter(item=btc).count() == 3


def test_the_history_needs_a_staff_sign_in(client: Client) -> None:
    response = client.get("/admin/rates/rate/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
