from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from items.selectors import item_list
from rates.policy import DERIVED_SEPARATOR, provider_freshness


@require_safe
def dashboard(request: HttpRequest) -> HttpResponse:
    """The live table: the page opens /ws/items and every value arrives over the socket."""
    config = {
        "ws_path": "/ws/items",
        "providers_url": "/api/v1/providers",
        # Each pair's chart starts from its candles; the socket's courses name pairs, not ids.
        "candles_url": "/api/v1/items/{id}/candles",
        # A click on the pair chart asks what was served then (`?at=`).
        "latest_url": "/api/v1/items/{id}/rates/latest",
        "items": {item.code: item.id for item in item_list(is_active=True).only("id", "code")},
        "stale_after": settings.KURS_STALE_AFTER,
        # Each provider's freshness window; a cross rate "a+b" takes its legs' smallest.
        "freshness": {name: provider_freshness(name) for name in settings.KURS_PROVIDERS},
        "derived_separator": DERIVED_SEPARATOR,
    }
    return render(request, "dashboard.html", {"config": config})
