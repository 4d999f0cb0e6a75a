"""WebSocket routes of the live pages (mounted by monitor_project.asgi).

The last route takes every other path: Channels' URLRouter would raise "No route found" for it, which the server
turns into a 500 and a traceback. A socket to an unknown path is a typo or a scanner, not an error.
"""
from __future__ import annotations

import logging

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, WebSocketScope
from django.urls import re_path

from conversations.consumers import LiveConsumer

logger = logging.getLogger(__name__)


async def refuse_unknown_path(scope: WebSocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Close before accepting: the server answers the handshake with a 403. Logged in one short line."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client left before its handshake was read: nothing to answer
    logger.info("socket refused: no route for %.200s", scope.get("path"))
    await send({"type": "websocket.close", "code": 1000, "reason": None})


websocket_urlpatterns = [
    re_path(r"^ws/live/$", LiveConsumer.as_asgi()),
    re_path(r"^ws/live/queues/(?P<queue_id>[^/]+)/$", LiveConsumer.as_asgi()),
    re_path(r"^ws/live/conversations/(?P<conversation_id>[^/]+)/$", LiveConsumer.as_asgi()),
    re_path(r"", refuse_unknown_path),  # last: whatever the routes above do not take
]
