"""WebSocket routes of the live pages (mounted by monitor_project.asgi)."""
from django.urls import re_path

from conversations.consumers import LiveConsumer

websocket_urlpatterns = [
    re_path(r"^ws/live/$", LiveConsumer.as_asgi()),
    re_path(r"^ws/live/queues/(?P<queue_id>[^/]+)/$", LiveConsumer.as_asgi()),
    re_path(r"^ws/live/conversations/(?P<conversation_id>[^/]+)/$", LiveConsumer.as_asgi()),
]
