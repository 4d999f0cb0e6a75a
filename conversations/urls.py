"""The web pages and the JSON API (the WebSocket routes are in routing.py)."""
from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.generic import RedirectView

from conversations import api, views

app_name = "conversations"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="conversations:live", permanent=False), name="home"),
    path("login/", auth_views.LoginView.as_view(template_name="registration/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("live/", views.live, name="live"),
    path("live/state.json", views.live_state, name="live-state"),
    path("live/health.json", views.live_health, name="live-health"),
    path("conversations/", views.conversation_list, name="conversation-list"),
    path("conversations/export.csv", views.conversation_export, name="conversation-export"),
    path("conversations/<str:conversation_id>/", views.conversation_detail, name="conversation-detail"),
    path("api/conversations/", api.conversation_list, name="api-conversation-list"),
    path("api/conversations/<str:conversation_id>/", api.conversation_detail, name="api-conversation-detail"),
]
