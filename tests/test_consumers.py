"""The live WebSocket: who may connect, which groups a socket hears, and what the publisher sends after a commit.

Each test drives the real ASGI application (or the consumer) with channels' WebsocketCommunicator on the real
channel layer (in-memory, or Redis when REDIS_URL is set), and publishes with the real Publisher.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser, User
from django.db import connections
from django.test import Client

from conversations import realtime, services
from conversations.routing import websocket_urlpatterns
from tests.factories import lifecycle, typed

ORIGIN = (b"origin", b"http://localhost")
ROUTER = URLRouter(websocket_urlpatterns)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


@pytest.fixture(autouse=True)
def fresh_channel_layer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test runs its own event loop: give it its own layer (a Redis layer receives on one loop at a time),
    and poll Redis for 1 s at a time, since a closed consumer waits out its pending poll (5 s by default)."""
    monkeypatch.setattr(RedisChannelLayer, "brpop_timeout", 1)
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    yield
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


def staff() -> User:
    return get_user_model()(username="supervisor", is_staff=True, is_active=True)


async def connect(path: str, user: Any) -> WebsocketCommunicator:
    """The consumer behind the real routes, with the user the auth middleware would have put in the scope."""
    communicator = WebsocketCommunicator(ROUTER, path)
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected, f"{path} refused {user}"
    return communicator


async def receive_conversations(communicator: WebsocketCommunicator, timeout: float = 3) -> list[dict]:
    message = await communicator.receive_json_from(timeout=timeout)
    while message["type"] != "conversations":
        message = await communicator.receive_json_from(timeout=timeout)
    return message["conversations"]


@pytest.mark.django_db
def test_committed_conversations_reach_the_all_queue_and_conversation_sockets() -> None:
    events = lifecycle("conv-1")
    first = services.ingest_batch(events=[typed(p) for p in events[:2]], source="sse")  # start, agent joins
    other = services.ingest_batch(events=[typed(p) for p in lifecycle("conv-2")[:1]], source="sse")

    async def scenario() -> None:
        publisher = realtime.Publisher(loop=asyncio.get_running_loop())
        everything = await connect("/ws/live/", staff())
        queue = await connect("/ws/live/queues/queue-support/", staff())
        one = await connect("/ws/live/conversations/conv-2/", staff())
        publisher.publish(first)
        publisher.publish(other)
        seen = await receive_conversations(everything)
        assert {s["conversation_id"] for s in seen} == {"conv-1", "conv-2"}
        conv1 = next(s for s in seen if s["conversation_id"] == "conv-1")
        assert (conv1["state"], conv1["queue_id"], conv1["agent_name"]) == ("active", "queue-support", "José Müller")
        assert conv1["updated_at"] and conv1["started_at"] == "2026-11-28T09:00:00+00:00"
        assert {s["conversation_id"] for s in await receive_conversations(queue)} == {"conv-1", "conv-2"}
        assert [s["conversation_id"] for s in await receive_conversations(one)] == ["conv-2"]
        stats = await everything.receive_json_from(timeout=3)
        assert stats["type"] == "stats" and stats["events"] == 3
        for communicator in (everything, queue, one):
            await communicator.disconnect()
        await publisher.aclose()

    run(scenario)


@pytest.mark.django_db
def test_a_transfer_tells_the_queue_it_left_so_its_page_can_drop_the_conversation() -> None:
    events = lifecycle("conv-1")
    before = services.ingest_batch(events=[typed(p) for p in events[:2]], source="sse")
    after = services.ingest_batch(events=[typed(events[2])], source="sse")  # transferred to queue-billing

    async def scenario() -> None:
        publisher = realtime.Publisher(loop=asyncio.get_running_loop())
        support = await connect("/ws/live/queues/queue-support/", staff())
        billing = await connect("/ws/live/queues/queue-billing/", staff())
        publisher.publish(before)
        assert (await receive_conversations(support))[0]["queue_id"] == "queue-support"
        publisher.publish(after)
        assert (await receive_conversations(support))[0]["queue_id"] == "queue-billing"
        assert (await receive_conversations(billing))[0]["agent_name"] == "李雷"
        await support.disconnect()
        await billing.disconnect()
        await publisher.aclose()

    run(scenario)


@pytest.mark.django_db
def test_a_burst_reaches_a_browser_as_a_few_coalesced_updates_ending_in_the_newest_state() -> None:
    updates = 60

    def burst(publisher: realtime.Publisher) -> float:
        """The writer thread committing 60 batches that touch one conversation, 5 ms apart."""
        started = time.monotonic()
        for n in range(updates):
            state = "ended" if n == updates - 1 else "active"
            publisher.publish_snapshots([{"conversation_id": "c1", "state": state, "queue_id": "q1",
                                          "updated_at": f"{n:04d}"}], events=1)
            time.sleep(0.005)
        return time.monotonic() - started

    async def scenario() -> None:
        publisher = realtime.Publisher(loop=asyncio.get_running_loop(), interval=0.25)
        socket = await connect("/ws/live/conversations/c1/", staff())
        took = await asyncio.to_thread(burst, publisher)
        received: list[dict] = []
        while not received or received[-1]["state"] != "ended":
            received += await receive_conversations(socket)
        assert received[-1]["updated_at"] == f"{updates - 1:04d}"
        # One message per flush at most: the burst's length over the interval, plus the first and the last.
        assert 1 <= len(received) <= took / 0.25 + 2, (len(received), took)
        await socket.disconnect()
        await publisher.aclose()

    run(scenario)


async def refused(communicator: WebsocketCommunicator) -> bool:
    connected, _ = await communicator.connect()
    await communicator.disconnect()  # as the server does after a refusal: the consumer then ends
    return not connected


@pytest.mark.django_db
def test_anonymous_and_non_staff_sockets_are_refused() -> None:
    async def scenario() -> None:
        for user in (AnonymousUser(), get_user_model()(username="agent", is_staff=False, is_active=True),
                     get_user_model()(username="gone", is_staff=True, is_active=False)):
            communicator = WebsocketCommunicator(ROUTER, "/ws/live/")
            communicator.scope["user"] = user
            assert await refused(communicator), user

    run(scenario)


@pytest.mark.django_db
def test_the_asgi_application_refuses_a_socket_without_a_session() -> None:
    from monitor_project.asgi import application

    async def scenario() -> None:
        assert await refused(WebsocketCommunicator(application, "/ws/live/", headers=[ORIGIN]))

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_the_asgi_application_accepts_a_staff_session_from_its_own_site_only() -> None:
    from monitor_project.asgi import application

    client = Client()
    client.force_login(get_user_model().objects.create_user("supervisor", is_staff=True))
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()

    async def scenario() -> None:
        same_site = WebsocketCommunicator(application, "/ws/live/", headers=[ORIGIN, (b"cookie", cookie)])
        connected, _ = await same_site.connect()
        assert connected
        await same_site.send_json_to({"type": "ping"})
        assert await same_site.receive_json_from(timeout=3) == {"type": "pong"}
        await same_site.disconnect()
        # Cross-site WebSocket hijacking: the browser sends the cookie, the Origin gives the other site away.
        elsewhere = WebsocketCommunicator(application, "/ws/live/",
                                          headers=[(b"origin", b"https://evil.example"), (b"cookie", cookie)])
        assert await refused(elsewhere)
        await database_sync_to_async(connections.close_all)()  # the auth middleware's thread's connection

    run(scenario)


def test_a_channel_layer_that_is_down_costs_live_updates_never_ingestion(caplog: pytest.LogCaptureFixture) -> None:
    """Redis on a port where nothing listens: the flush logs a warning and the publisher keeps going."""
    layer = RedisChannelLayer(hosts=["redis://127.0.0.1:9/0"])
    flushed = threading.Event()

    async def scenario() -> None:
        publisher = realtime.Publisher(loop=asyncio.get_running_loop(), layer=layer)
        with caplog.at_level(logging.WARNING, logger="conversations.realtime"):
            publisher.publish_snapshots([{"conversation_id": "c1", "state": "active", "queue_id": "q1"}])
            await publisher.flush()
            flushed.set()
        assert publisher.flushes == 0
        publisher.publish_snapshots([{"conversation_id": "c2", "state": "active", "queue_id": "q1"}])
        assert publisher.buffer.take().snapshots[0]["conversation_id"] == "c2"  # still accepting work
        await publisher.aclose()

    run(scenario)
    assert flushed.is_set()
    assert "live publish failed" in caplog.text


def test_the_default_layer_is_redis_exactly_when_redis_url_is_set(settings: Any) -> None:
    layer = get_channel_layer()
    assert isinstance(layer, RedisChannelLayer) == bool(settings.REDIS_URL)
