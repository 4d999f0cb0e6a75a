"""The ASGI entry point: Django for HTTP, Channels for the live pages' WebSockets.

Serve it with `daphne monitor_project.asgi:application` (or uvicorn). WebSockets must come from a page of
an allowed host (no cross-site sockets) and carry a logged-in session; the consumers check the user is staff.
A socket to any other path is refused before its handshake (routing.refuse_unknown_path).
"""
import os

from django.core.asgi import get_asgi_application

from monitor_project.settings.environment import load_settings_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "monitor_project.settings.production")
load_settings_or_exit()
# Django must be set up before anything imports models, the consumers included.
django_asgi_app = get_asgi_application()

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, LifespanScope
from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator

from conversations.routing import websocket_urlpatterns


async def lifespan(scope: LifespanScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """uvicorn opens a lifespan scope at startup; without an answer Channels raises "No application configured".
    Nothing needs setting up or tearing down here (Django connects lazily), so both steps just complete."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        "lifespan": lifespan,
    }
)
