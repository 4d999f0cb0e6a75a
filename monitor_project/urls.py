from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from conversations import health, metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    # Answered first by conversations.health.ProbeMiddleware; listed here so they also route without it.
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("", include("conversations.urls")),  # live page, history, JSON API; "/" goes to the live page
]
