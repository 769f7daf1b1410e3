from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from rates.policy import DERIVED_SEPARATOR, provider_freshness


@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    """The live table: the page opens /ws/items and every value arrives over the socket."""
    config = {
        "ws_path": "/ws/items",
        "providers_url": "/api/v1/providers",
        "stale_after": settings.KURS_STALE_AFTER,
        # Each provider's freshness window; a cross rate "a+b" takes its legs' smallest.
        "freshness": {name: provider_freshness(name) for name in settings.KURS_PROVIDERS},
        "derived_separator": DERIVED_SEPARATOR,
    }
    return render(request, "dashboard.html", {"config": config})
