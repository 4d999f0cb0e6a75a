"""The live page's HTTP side (the state it reloads on every (re)connect, stream health) and the publisher's buffer."""
from __future__ import annotations

from datetime import timedelta

import pytest
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from conversations import realtime
from conversations.models import Conversation, Event, StreamCheckpoint, StreamConnection, WorkerHeartbeat

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_user("supervisor", is_staff=True))
    return client


def make(cid: str, state: str, *, minutes_ago: float = 1, **fields: object) -> Conversation:
    now = timezone.now()
    started = now - timedelta(minutes=minutes_ago)
    times = {"started_at": started, "last_event_at": started}
    if state in ("ended", "wrapped_up"):
        times["ended_at"] = started + timedelta(seconds=30)
    if state == "wrapped_up":
        times["wrapped_up_at"] = started + timedelta(seconds=60)
    return Conversation.objects.create(conversation_id=cid, state=state, queue_id=fields.pop("queue_id", "q1"),
                                       **times, **fields)


def test_the_live_page_renders_for_staff_with_its_socket_and_state_urls(staff_client: Client) -> None:
    response = staff_client.get(reverse("conversations:live"), {"queue": "q 1/ü"})
    page = response.content.decode()
    assert response.status_code == 200
    assert '"socketPath": "/ws/live/queues/q%201%2F%C3%BC/"' in page
    assert "/live/state.json?queue=q+1%2F%C3%BC" in page
    assert "conversations/live.js" in page


def test_the_state_holds_conversations_in_progress_and_in_after_call_work_only(staff_client: Client) -> None:
    make("talking", "active", agent_id="a1", agent_name="Zoë")
    make("in-acw", "ended", minutes_ago=5)
    make("done", "wrapped_up")
    make("long-ended", "ended", minutes_ago=90)  # its wrap-up never came: not on the wallboard forever
    make("stale", "active", minutes_ago=60 * 24)  # its end never came
    make("other-queue", "active", queue_id="q2")
    state = staff_client.get(reverse("conversations:live-state")).json()
    assert {c["conversation_id"] for c in state["conversations"]} == {"talking", "in-acw", "other-queue"}
    talking = next(c for c in state["conversations"] if c["conversation_id"] == "talking")
    assert talking["agent_name"] == "Zoë" and talking["state_since"] == talking["started_at"]
    in_acw = next(c for c in state["conversations"] if c["conversation_id"] == "in-acw")
    assert in_acw["state_since"] == in_acw["ended_at"]
    assert state["today"]["by_state"]["wrapped_up"] >= 1 and state["today"]["total"] >= 4
    by_queue = staff_client.get(reverse("conversations:live-state"), {"queue": "q2"}).json()
    assert [c["conversation_id"] for c in by_queue["conversations"]] == ["other-queue"]


def test_the_state_counts_events_received_in_the_last_minute(staff_client: Client) -> None:
    now = timezone.now()
    for n, seconds_ago in enumerate((5, 30, 90)):
        Event.objects.create(dedupe_key=f"k{n}", kind="start", event_type="conversation:start",
                             conversation_id=f"c{n}", occurred_at=now, received_at=now - timedelta(seconds=seconds_ago),
                             source="sse", payload={})
    assert staff_client.get(reverse("conversations:live-state")).json()["events_last_minute"] == 2


def test_stream_health_is_empty_but_valid_before_any_worker_ran(staff_client: Client) -> None:
    health = staff_client.get(reverse("conversations:live-health")).json()
    assert (health["workers"], health["connections"], health["checkpoints"]) == ([], [], [])


def test_stream_health_shows_source_connection_heartbeat_and_reconnects(staff_client: Client) -> None:
    now = timezone.now()
    StreamConnection.objects.create(source="sse", worker="host:1", connected_at=now - timedelta(hours=1),
                                    disconnected_at=now - timedelta(minutes=10), disconnect_reason="read timeout")
    StreamConnection.objects.create(source="sse", worker="host:1", connected_at=now - timedelta(minutes=10),
                                    last_event_at=now - timedelta(seconds=2), events_received=42)
    WorkerHeartbeat.objects.create(worker="host:1", source="sse", started_at=now - timedelta(hours=2),
                                   beat_at=now - timedelta(seconds=3), connected=True, reconnects=1,
                                   events_committed=42)
    WorkerHeartbeat.objects.create(worker="host:0", source="sse", started_at=now - timedelta(days=1),
                                   beat_at=now - timedelta(hours=3), connected=False)
    StreamCheckpoint.objects.create(source="sse", last_event_id="1234", events_committed=42)
    health = staff_client.get(reverse("conversations:live-health")).json()
    connection = health["connections"][0]
    assert connection["connected"] and connection["events_received"] == 42 and connection["reconnects"] == 1
    assert [(w["worker"], w["stale"]) for w in health["workers"]] == [("host:1", False), ("host:0", True)]
    assert health["checkpoints"][0]["last_event_id"] == "1234"


def test_the_pages_json_refuses_anonymous_visitors_without_redirecting() -> None:
    for name in ("conversations:live-state", "conversations:live-health"):
        response = Client().get(reverse(name))
        assert response.status_code == 401 and response.json()["login"] == reverse("conversations:login")


# -- the publisher's buffer ------------------------------------------------------------------------------------
def snap(cid: str, state: str = "active", queue: str = "q1") -> dict:
    return {"conversation_id": cid, "state": state, "queue_id": queue}


def test_a_burst_for_one_conversation_coalesces_into_its_newest_snapshot() -> None:
    buffer = realtime.Coalescer(capacity=10)
    assert buffer.put([snap("c1")], events=1) is True  # the first put wakes the loop
    for state in ("active", "active", "ended"):
        assert buffer.put([snap("c1", state)], events=1) is False
    pending = buffer.take()
    assert pending.snapshots == [snap("c1", "ended")] and pending.events == 4 and pending.dropped == 0
    assert buffer.take().snapshots == []


def test_a_full_buffer_drops_the_oldest_conversation_first() -> None:
    buffer = realtime.Coalescer(capacity=3)
    buffer.put([snap(f"c{n}") for n in range(5)])
    buffer.put([snap("c2", "ended")])  # an update moves a conversation to the newest end
    pending = buffer.take()
    assert [s["conversation_id"] for s in pending.snapshots] == ["c3", "c4", "c2"] and pending.dropped == 2


def test_group_names_stay_valid_for_any_id() -> None:
    assert realtime.queue_group("3fa85f64-5717-4562-b3fc-2c963f66afa6") == (
        "live.queue.3fa85f64-5717-4562-b3fc-2c963f66afa6")
    odd = realtime.conversation_group("id with spaces/ü" * 10)
    assert odd.startswith("live.conversation.h") and len(odd) < 100 and odd.isascii()


def test_a_worker_in_its_own_process_publishes_only_where_a_page_can_hear_it() -> None:
    listener = realtime.after_commit_listener()
    try:
        if isinstance(get_channel_layer(), InMemoryChannelLayer):
            assert listener is None  # nobody in this process listens; REDIS_URL would carry it
        else:
            assert listener is not None
    finally:
        realtime.shutdown_publisher()
