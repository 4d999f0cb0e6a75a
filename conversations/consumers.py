"""The live pages' WebSocket: authenticate, join groups, forward. Nothing else happens here.

A socket follows every conversation (`/ws/live/`), one queue (`/ws/live/queues/<queue id>/`) or one conversation
(`/ws/live/conversations/<conversation id>/`). Only logged-in staff may listen; anyone else is refused before
the handshake completes. What arrives is produced by `conversations.realtime.Publisher`.
"""
from __future__ import annotations

import logging
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from conversations import realtime

logger = logging.getLogger(__name__)


def can_watch(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


class LiveConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if not can_watch(user):
            logger.info("live socket refused for %s on %s", getattr(user, "username", None) or "anonymous",
                        self.scope.get("path"))
            await self.close()
            return
        # Joined only now, so a refused socket never sits in a group; websocket_disconnect leaves them.
        self.groups = [realtime.STATS_GROUP, self.target_group()]
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    def target_group(self) -> str:
        kwargs = self.scope["url_route"]["kwargs"]
        if kwargs.get("queue_id"):
            return realtime.queue_group(kwargs["queue_id"])
        if kwargs.get("conversation_id"):
            return realtime.conversation_group(kwargs["conversation_id"])
        return realtime.ALL_GROUP

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Read-only: the only thing a page may say is ping, to check the socket is alive."""
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def live_conversations(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "conversations", "conversations": message["conversations"]})

    async def live_stats(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "stats", "events": message["events"], "at": message["at"]})
