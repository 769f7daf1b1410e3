"""The project's URLs plus one plain django-ninja endpoint (the baseline of item detail)."""

from __future__ import annotations

import os
from pathlib import Path

from django.http import HttpRequest, HttpResponse
from django.urls import path
from ninja import NinjaAPI

from config.urls import urlpatterns as project_urlpatterns

# The bytes of `GET /api/v1/items/1`, written by the bench before the server starts.
BODY = Path(os.environ["KURS_BENCH_ITEM_BODY"]).read_bytes()

plain = NinjaAPI(urls_namespace="bench-plain", docs_url=None, openapi_url=None)


@plain.get("/item")
async def plain_item(request: HttpRequest) -> HttpResponse:
    return HttpResponse(BODY, content_type="application/json; charset=utf-8")


urlpatterns = [*project_urlpatterns, path("bench/plain/", plain.urls)]

__all__ = ["urlpatterns"]
