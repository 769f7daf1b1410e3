"""Admin sign-in throttling (config/admin_throttle.py) over real HTTP: pytest-django's live
server, a browser-like client with its CSRF cookie."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import LazySettings
from django.contrib.auth import get_user_model
from django.core.cache import caches
from pytest_django.live_server_helper import LiveServer

pytestmark = pytest.mark.django_db(transaction=True)

LOCKED = "Too many failed sign-in attempts"
WRONG = "Please enter the correct username and password"


@pytest.fixture
def admin_site(live_server: LiveServer, settings: LazySettings) -> Iterator[httpx.Client]:
    caches["shared"].clear()
    settings.KURS_ADMIN_LOGIN_LIMIT = (5, 60)
    # A fast hasher: these tests sign in dozens of times, and the throttle is not about hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    get_user_model().objects.create_superuser("boss", "boss@example.com", "right-pass")
    with httpx.Client(base_url=live_server.url, timeout=10.0) as http:
        yield http
    caches["shared"].clear()


def sign_in(http: httpx.Client, username: str, password: str, **headers: str) -> httpx.Response:
    page = http.get("/admin/login/?next=/admin/", headers=headers)
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    form = {
        "csrfmiddlewaretoken": token.group(1),
        "username": username,
        "password": password,
        "next": "/admin/",
    }
    return http.post("/admin/login/?next=/admin/", data=form, headers=headers)


def test_five_failures_lock_the_address_out_even_with_the_right_password(
    admin_site: httpx.Client,
) -> None:
    for attempt in range(5):
        answer = sign_in(admin_site, "boss", f"guess-{attempt}")
        assert (answer.status_code, WRONG in answer.text) == (200, True)
    locked = sign_in(admin_site, "boss", "right-pass")
    assert locked.status_code == 429
    assert 55 <= int(locked.headers["retry-after"]) <= 60
    assert LOCKED in locked.text
    assert "sessionid" not in admin_site.cookies
    # Another username from the same address: the address is locked.
    assert sign_in(admin_site, "someone", "x").status_code == 429


def test_failures_for_one_username_from_many_addresses_lock_that_username(
    admin_site: httpx.Client, settings: Any
) -> None:
    """Behind one proxy (KURS_NUM_PROXIES=1) the address is X-Forwarded-For's last entry."""
    settings.NINJA_NUM_PROXIES = 1  # KURS_NUM_PROXIES
    for n in range(5):
        answer = sign_in(admin_site, "boss", "guess", **{"X-Forwarded-For": f"10.0.0.{n}"})
        assert answer.status_code == 200
    from_elsewhere = sign_in(admin_site, "BOSS", "right-pass", **{"X-Forwarded-For": "10.0.1.1"})
    assert from_elsewhere.status_code == 429
    # The addresses are not locked for other usernames: only 1 failure each.
    other = sign_in(admin_site, "someone", "x", **{"X-Forwarded-For": "10.0.0.1"})
    assert (other.status_code, WRONG in other.text) == (200, True)


def test_a_forged_forwarded_for_buys_no_new_attempts_without_a_proxy(
    admin_site: httpx.Client,
) -> None:
    statuses = [
        sign_in(admin_site, f"user{n}", "x", **{"X-Forwarded-For": f"10.0.0.{n}"}).status_code
        for n in range(7)
    ]
    assert statuses == [200] * 5 + [429] * 2


def test_a_right_password_under_the_limit_signs_in(admin_site: httpx.Client) -> None:
    for _ in range(4):
        assert sign_in(admin_site, "boss", "nope").status_code == 200
    answer = sign_in(admin_site, "boss", "right-pass")
    assert answer.status_code == 302
    assert answer.headers["location"] == "/admin/"
    assert "sessionid" in admin_site.cookies


def test_off_when_the_setting_is_empty(admin_site: httpx.Client, settings: LazySettings) -> None:
    settings.KURS_ADMIN_LOGIN_LIMIT = None
    assert {sign_in(admin_site, "boss", "nope").status_code for _ in range(8)} == {200}
    assert sign_in(admin_site, "boss", "right-pass").status_code == 302
