from __future__ import annotations

import pytest
from django.test import Client

from config import csp

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/", "/admin/login/", "/admin/"])
def test_the_dashboard_and_the_admin_have_the_policy(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code in (200, 302)
    assert response[csp.HEADER] == csp.POLICY
    assert "default-src 'self'" in response[csp.HEADER]


@pytest.mark.parametrize("path", ["/api/v1/items", "/api/v1/docs", "/metrics"])
def test_other_paths_are_left_alone(client: Client, path: str) -> None:
    # Swagger UI (the API docs) would not load under it; JSON and metrics have no use for one.
    assert csp.HEADER not in client.get(path)


def test_the_dashboard_page_has_no_inline_script_or_style(client: Client) -> None:
    html = client.get("/").content.decode()
    assert "<style" not in html
    assert " style=" not in html
    scripts = html.split("<script")[1:]
    # The configuration (JSON, never executed) and the static script; nothing inline to run.
    assert len(scripts) == 2
    assert 'type="application/json"' in scripts[0]
    assert scripts[1].startswith(' src="/static/realtime/dashboard.js"></script>')


def test_the_dashboard_answers_head_like_get_and_refuses_writes(client: Client) -> None:
    # `curl -I http://127.0.0.1:8000/` is how people check a page is up.
    got, head = client.get("/"), client.head("/")
    assert (head.status_code, head.content) == (200, b"")
    assert head["Content-Security-Policy"] == got["Content-Security-Policy"]
    assert client.post("/").status_code == 405
