"""The ASGI entry point: Django for HTTP, Channels for the live pages' WebSockets.

Serve it with `daphne monitor_project.asgi:application` (or uvicorn). WebSockets must come from a page of
an allowed host (no cross-site sockets) and carry a logged-in session; the consumers check the user is staff.
"""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "monitor_project.settings.production")
# Django must be set up before anything imports models, the consumers included.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator

from conversations.routing import websocket_urlpatterns

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
