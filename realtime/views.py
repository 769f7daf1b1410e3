from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    """The live table: the page only opens /ws/items; every value arrives over the socket."""
    return render(request, "dashboard.html", {"ws_path": "/ws/items"})
