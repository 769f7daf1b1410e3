"""The API docs page, `/api/v1/docs`, in headless Chromium (Debian's /usr/bin/chromium driven by
Playwright), served by a real uvicorn with production settings (tests/test_schemathesis.py's).

The page is the way in that a newcomer meets first (docs/api.md): Swagger UI must parse the
OpenAPI document (a duplicated key, such as two "200" responses, stops it with "Parser error"),
render every operation, show the event stream's `text/event-stream` response, and log no
console error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from django.test import Client

from realtime.tests.test_dashboard import browser_page, chromium
from tests.test_schemathesis import Served, served

# Fixtures, used by name: chromium (Debian's browser, or a skip) and served (a uvicorn web
# process with production settings on a fresh migrated database, one fetch cycle stored).
__all__ = ["chromium", "served"]


def test_the_openapi_document_has_no_duplicated_key(client: Client) -> None:
    """What Swagger UI's parser refuses; Python's json module silently keeps the last one."""
    duplicated: list[str] = []

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        duplicated.extend(key for key in dict.fromkeys(keys) if keys.count(key) > 1)
        return dict(pairs)

    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content, object_pairs_hook=members)
    assert duplicated == []
    answer = document["paths"]["/api/v1/stream"]["get"]["responses"]["200"]
    event = answer["content"]["text/event-stream"]["schema"]
    assert event["properties"]["data"]["contentMediaType"] == "application/json"


def documented_operations(base_url: str) -> list[tuple[str, str]]:
    document = httpx.get(f"{base_url}/api/v1/openapi.json", timeout=10).json()
    return [
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    ]


async def test_the_docs_page_renders_every_operation_without_an_error(
    served: Served, chromium: Path
) -> None:
    operations = documented_operations(served.url)
    assert ("GET", "/api/v1/stream") in operations
    async with browser_page(chromium, viewport={"width": 1400, "height": 900}) as (page, errors):
        await page.goto(f"{served.url}/api/v1/docs")
        # Swagger UI shows either the operations or what stopped it from parsing the document.
        await page.locator(".opblock, .errors-wrapper").first.wait_for(timeout=15_000)
        problems = page.locator(".errors-wrapper")
        assert await problems.count() == 0, await problems.inner_text()
        blocks = page.locator(".opblock")
        shown = [
            (
                (await block.locator(".opblock-summary-method").inner_text()).strip(),
                (await block.locator(".opblock-summary-path").get_attribute("data-path") or ""),
            )
            for block in await blocks.all()
        ]
        assert sorted(shown) == sorted(operations)
        assert "Parser error" not in await page.locator("body").inner_text()

        # The event stream's answer: the media type and the event's shape, not a bare string.
        stream = page.locator(".opblock", has=page.locator('[data-path="/api/v1/stream"]'))
        await stream.locator(".opblock-summary").click()
        responses = stream.locator(".responses-table")
        await responses.wait_for(timeout=10_000)
        assert "text/event-stream" in await responses.inner_text()
        assert errors == []
