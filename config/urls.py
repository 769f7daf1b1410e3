from __future__ import annotations

from django.contrib import admin
from django.urls import path

from config.api import api
from edge.metrics import metrics_view
from realtime.sse import router as stream_router
from realtime.views import dashboard

# The event stream is a realtime concern: its operation lives in realtime/sse.py.
api.add_router("/stream", stream_router)

urlpatterns = [
    path("", dashboard, name="dashboard"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("metrics", metrics_view, name="metrics"),
]
