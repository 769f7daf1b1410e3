from __future__ import annotations

import pytest

from edge import csp
from edge.tests.asgi import call

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("path", ["/", "/admin/login/", "/admin/"])
async def test_the_dashboard_and_the_admin_have_the_policy(path: str) -> None:
    answer = await call(path)
    assert answer.status in (200, 302)
    assert answer.header(csp.HEADER) == csp.POLICY.encode()
    assert "default-src 'self'" in csp.POLICY


@pytest.mark.parametrize("path", ["/api/v1/items", "/api/v1/docs", "/metrics"])
async def test_other_paths_are_left_alone(path: str) -> None:
    # Swagger UI (the API docs) would not load under it; JSON and metrics have no use for one.
    assert (await call(path)).header(csp.HEADER) is None


async def test_the_dashboard_page_has_no_inline_script_or_style() -> None:
    html = (await call("/")).body.decode()
    assert "<style" not in html
    assert " style=" not in html
    scripts = html.split("<script")[1:]
    # The configuration (JSON, never executed) and static scripts; nothing inline to run.
    assert 'type="application/json"' in scripts[0]
    sources = [script.split('"')[1] for script in scripts[1:]]
    assert sources == [
        "/static/realtime/vendor/lightweight-charts.standalone.production.js",
        "/static/realtime/dashboard.js",
        "/static/realtime/chart.js",
    ]
    assert all(script.startswith(' src="') and '"></script>' in script for script in scripts[1:])


async def test_the_dashboard_answers_head_like_get_and_refuses_writes() -> None:
    # `curl -I http://127.0.0.1:8000/` is how people check a page is up.
    got, head = await call("/"), await call("/", method="HEAD")
    assert (head.status, head.body) == (200, b"")
    assert head.header(csp.HEADER) == got.header(csp.HEADER)
    # A form POST without Django's CSRF cookie is refused before the view's own 405.
    assert (await call("/", method="POST")).status == 403
