"""Admin sign-in throttled: failed attempts per client address and per username.

KURS_ADMIN_LOGIN_LIMIT (`5/min` by default; empty turns it off) failed sign-ins from one address,
or for one username from anywhere, lock that address or username out for the period (a minute)
from the failure that reached the limit. While locked, every attempt, a right password included,
gets the sign-in form again with "Too many failed sign-in attempts" and status 429 with
`Retry-After`, and costs no password check. Counted in the shared cache (Redis when
configured), so every web process and worker shares one count.

Failures are counted by Django's `user_login_failed` signal, whatever view authenticated; the
lockout is checked by the admin's login form before it authenticates. A username lockout also
locks the real user out for that minute: the price of stopping a distributed guesser.

The client is the address the API's rate limits see (ninja's `get_ident` under KURS_NUM_PROXIES,
through `edge.clients`).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.cache import caches
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse

from edge.clients import client_of_request

LOCKED_MESSAGE = "Too many failed sign-in attempts. Try again in %(seconds)d seconds."


def _keys(request: HttpRequest | None, username: Any) -> list[str]:
    keys = []
    if request is not None:
        address = client_of_request(request)
        if address:
            keys.append(f"admin-login:address:{address}")
    if isinstance(username, str) and username:
        # Hashed: the cache key stays short and holds no user input.
        digest = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
        keys.append(f"admin-login:user:{digest}")
    return keys


def locked_for(request: HttpRequest | None, username: Any) -> int | None:
    """Seconds until this address and username may try again; None when they may now."""
    if settings.KURS_ADMIN_LOGIN_LIMIT is None:
        return None
    cache = caches["shared"]
    now = time.time()
    until = max((cache.get(f"{key}:locked", 0.0) for key in _keys(request, username)), default=0.0)
    return math.ceil(until - now) if until > now else None


def record_failure(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    """`user_login_failed`: one more failure for the address and the username."""
    limit = settings.KURS_ADMIN_LOGIN_LIMIT
    if limit is None:
        return
    count, period = limit
    cache = caches["shared"]
    for key in _keys(request, credentials.get("username")):
        # The count lives a period from the first failure; add() keeps it when it exists.
        cache.add(f"{key}:failures", 0, timeout=period)
        try:
            failures = cache.incr(f"{key}:failures")
        except ValueError:  # expired between add() and incr()
            cache.add(f"{key}:failures", 1, timeout=period)
            failures = 1
        if failures >= count:
            cache.set(f"{key}:locked", time.time() + period, timeout=period)
            cache.delete(f"{key}:failures")


class ThrottledAuthenticationForm(AdminAuthenticationForm):
    """The admin's sign-in form, refusing before any password check while locked out."""

    error_messages = {**AdminAuthenticationForm.error_messages, "locked": LOCKED_MESSAGE}
    retry_after: int | None = None

    def clean(self) -> dict[str, Any]:
        wait = locked_for(self.request, self.cleaned_data.get("username"))
        if wait is not None:
            self.retry_after = wait
            raise ValidationError(
                self.error_messages["locked"], code="locked", params={"seconds": wait}
            )
        return super().clean()


class KursAdminSite(AdminSite):
    """Django's admin site with the throttled sign-in (the default site: config/apps.py)."""

    login_form = ThrottledAuthenticationForm

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        response: HttpResponse = super().login(request, extra_context)
        context = getattr(response, "context_data", None) or {}
        wait = getattr(context.get("form"), "retry_after", None)
        if wait is not None:
            response.status_code = 429
            response["Retry-After"] = str(wait)
        return response
