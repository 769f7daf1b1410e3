"""config.middleware: request ids, the access line, the `/api/` rules (docs/api.md#conventions)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from django.test import AsyncClient, Client
from django.test.utils import override_settings

from items.models import Item

pytestmark = pytest.mark.django_db


@pytest.fixture
def item() -> Item:
    return Item.objects.get_or_create(base="BTC", quote="USD")[0]


@pytest.mark.parametrize("debug", [True, False])
@pytest.mark.parametrize("path", ["/api/v1/no-such-thing", "/api/v1/no-such-thing/", "/api/x"])
def test_it_answers_json_404_for_unknown_api_paths_in_every_mode(
    client: Client, debug: bool, path: str
) -> None:
    with override_settings(DEBUG=debug):
        response = client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"detail": "not found"}


def test_it_keeps_the_api_s_own_404_detail_and_html_outside_the_api(
    client: Client, item: Item
) -> None:
    missing = client.get("/api/v1/items/999999999")
    assert missing.status_code == 404
    assert missing.json()["detail"] != "not found"  # the API's own message, untouched
    with override_settings(DEBUG=True):
        page = client.get("/no-such-page")
    assert page.status_code == 404
    assert page["Content-Type"].startswith("text/html")


def test_it_treats_empty_query_parameters_as_absent(client: Client, item: Item) -> None:
    path = f"/api/v1/items/{item.id}/rates"
    empty = client.get(f"{path}?since=&until=&date=&provider=&limit=")
    assert empty.status_code == 200, empty.content
    assert empty.json() == client.get(path).json()
    assert client.get("/api/v1/items?is_active=&limit=&offset=").status_code == 200


def test_it_still_validates_a_non_empty_value_beside_an_empty_one(
    client: Client, item: Item
) -> None:
    response = client.get(f"/api/v1/items/{item.id}/rates?since=&until=yesterday")
    assert response.status_code == 422
    assert [error["field"] for error in response.json()["errors"]] == ["until"]
    kept = client.get(f"/api/v1/items/{item.id}/rates?provider=&provider=binance")
    assert kept.status_code == 200


def test_it_returns_a_generated_request_id_and_keeps_a_sane_incoming_one(client: Client) -> None:
    generated = client.get("/api/v1/health")["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/api/v1/health")["X-Request-ID"] != generated
    sane = "7f0c2a9e-lb-1:abc"
    assert client.get("/api/v1/health", HTTP_X_REQUEST_ID=sane)["X-Request-ID"] == sane


@pytest.mark.parametrize("bad", ["short", "a b c d e f g h", "x" * 129, "id\nFORGED LINE"])
def test_it_replaces_an_insane_incoming_request_id(client: Client, bad: str) -> None:
    returned = client.get("/api/v1/health", HTTP_X_REQUEST_ID=bad)["X-Request-ID"]
    assert returned != bad
    assert len(returned) == 32


async def test_it_logs_one_access_line_with_the_request_id_in_async_views(
    async_client: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kurs.access"):
        response = await async_client.get(
            "/api/v1/no-such-thing?x=1", headers={"X-Request-ID": "trace-12345678"}
        )
    lines = [record for record in caplog.records if record.name == "kurs.access"]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith("GET /api/v1/no-such-thing?x=1 404 ")
    assert lines[0].status == 404  # type: ignore[attr-defined]  # the log call's `extra`
    assert response["X-Request-ID"] == "trace-12345678"


def test_the_handler_filter_puts_the_request_id_on_lines_logged_in_the_request(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # The id is added by a handler filter: check it the way the JSON handler would see it.
    from config.logs import RequestIdFilter

    seen: list[str | None] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            RequestIdFilter().filter(record)
            seen.append(getattr(record, "request_id", None))

    probe = Probe(level=logging.INFO)
    logging.getLogger("kurs.access").addHandler(probe)
    try:
        with caplog.at_level(logging.INFO, logger="kurs.access"):
            response = client.get("/api/v1/health")
    finally:
        logging.getLogger("kurs.access").removeHandler(probe)
    assert seen == [response["X-Request-ID"]]


def test_json_logs_carry_an_iso_8601_utc_ts_and_extra_fields() -> None:
    import json
    from logging.config import DictConfigurator

    from django.conf import settings

    formatter = DictConfigurator({}).configure_formatter(
        dict(settings.LOGGING["formatters"]["json"])
    )
    record = logging.LogRecord("rates.fetcher", logging.WARNING, __file__, 1, "down", None, None)
    record.created = datetime(2026, 11, 30, 18, 24, 36, 657000, tzinfo=UTC).timestamp()
    record.provider = "binance"
    record.color_message = "\x1b[36mdown\x1b[0m"  # what uvicorn adds to its records
    line = json.loads(formatter.format(record))
    assert line["ts"] == "2026-11-30T18:24:36.657Z"
    assert line["level"] == "WARNING"
    assert line["provider"] == "binance"
    assert "color_message" not in line


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("put", "/api/v1/items", "GET, POST"),
        ("delete", "/api/v1/items", "GET, POST"),
        ("post", "/api/v1/health", "GET"),
        ("trace", "/api/v1/providers", "GET"),
        ("put", "/api/v1/items/1", "GET, PATCH, DELETE"),
    ],
)
def test_a_method_not_allowed_under_the_api_is_json_with_allow(
    client: Client, method: str, path: str, allowed: str
) -> None:
    response = client.generic(method.upper(), path)
    assert response.status_code == 405
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {"detail": "method not allowed"}
    assert set(response["Allow"].split(", ")) == set(allowed.split(", "))
