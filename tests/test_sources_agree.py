"""The same conversations fed through SSE and through the Notifications API end in the same derived state.

One simulator tells one story on both wires. The worker runs on each source into the database (the real
pipeline and batch writer); the Conversation rows' derived fields, and the participants' common fields, must be
equal. The wire is not kind: payloads are duplicated and swapped with their neighbours, agents sometimes reject
a conversation before another answers (a user.end that is not the end), and the Notifications worker watches the
agents' user topics too, so every snapshot also arrives a second time on an overlapping topic.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from django.conf import settings

from conversations.genesys.scenario import AGENTS, Scenario
from conversations.genesys.simulator import Simulator
from conversations.models import Conversation, Event, Participant, RejectedEvent, StreamCheckpoint, StreamConnection
from conversations.pipeline import Totals
from conversations.worker import Worker

from tests.factories import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

CONVERSATIONS = 12
DERIVED = (
    "state", "media_type", "direction", "queue_id", "queue_name", "agent_id", "agent_name", "ani", "dnis",
    "wrapup_code", "wrapup_name", "wrapup_notes", "started_at", "ended_at", "wrapped_up_at", "last_event_at",
)
# What an SSE payload says about a participant (a snapshot says more: wrap-up code, notes, ACW seconds).
PARTICIPANT_FIELDS = ("purpose", "user_id", "name", "queue_id", "connected_at", "ended_at")


@pytest.fixture
def simulator() -> Simulator:
    sim = Simulator(client_id="sim-client", client_secret="sim-secret", seed=11, reject_rate=0.3)
    sim.notifications.heartbeat_interval = 0.5
    return sim



def unkind_wire(payloads: list[dict[str, Any]], *, seed: int = 3) -> list[dict[str, Any]]:
    """Every payload, some twice, some swapped with their neighbour."""
    rng = random.Random(seed)
    wire: list[dict[str, Any]] = []
    for payload in payloads:
        wire.append(payload)
        if rng.random() < 0.3:
            wire.append(payload)
    for i in range(0, len(wire) - 1, 2):
        if rng.random() < 0.4:
            wire[i], wire[i + 1] = wire[i + 1], wire[i]
    return wire


def derived_state() -> dict[str, Any]:
    conversations = {c.conversation_id: {f: getattr(c, f) for f in DERIVED} for c in Conversation.objects.all()}
    participants = {
        (p.conversation.conversation_id, p.participant_id): {f: getattr(p, f) for f in PARTICIPANT_FIELDS}
        for p in Participant.objects.select_related("conversation")
    }
    return {"conversations": conversations, "participants": participants}


def forget_everything() -> None:
    for model in (Event, Conversation, RejectedEvent, StreamCheckpoint):
        model.objects.all().delete()


def run_notifications_worker(sim: Simulator, wire: list[dict[str, Any]], *, topics: int) -> Totals:
    """Start the worker, feed the wire once its channel is subscribed, stop once every conversation is done."""
    stop = threading.Event()
    result: dict[str, Totals] = {}
    worker = threading.Thread(target=lambda: result.update(totals=Worker(source_name="notifications", stop=stop).run()))
    worker.start()
    try:
        hub = sim.notifications
        wait_for(lambda: hub.channel_ids() and len(hub.topics(hub.channel_ids()[0])) == topics,
                 what="the worker's channel subscribed")
        assert hub.wait_for_sockets(1)
        for payload in wire:  # paced like a live org, so each conversation's detail topics are subscribed in time
            sim.append(payload)
            time.sleep(0.01)
        conversations = len({p["conversationId"] for p in wire})
        wait_for(lambda: Conversation.objects.filter(state="wrapped_up").count() == conversations,
                 what="every conversation wrapped up")
        wait_for(quiet, what="the last messages to be committed")
    finally:
        stop.set()
        worker.join(timeout=20)
    return result["totals"]


def quiet(seconds: float = 0.4) -> bool:
    """No new event stored for a while."""
    before = Event.objects.count()
    time.sleep(seconds)
    return Event.objects.count() == before


def run_sse_worker(events: int) -> Totals:
    return Worker(source_name="sse", stop=threading.Event()).run(max_events=events)


def test_sse_and_notifications_end_in_the_same_derived_state(simulator: Simulator, genesys_settings) -> None:  # noqa: ANN001
    settings.GENESYS = replace(genesys_settings, user_ids=tuple(a.id for a in AGENTS),
                               notifications_sync_interval=0.05)
    wire = unkind_wire(Scenario(seed=5, reject_rate=0.3).timeline(CONVERSATIONS))

    notifications_totals = run_notifications_worker(simulator, wire, topics=6 + len(AGENTS))
    through_notifications = derived_state()
    detail_events = Event.objects.filter(source="notifications", event_type__startswith="detail.").count()
    rejected_offers = Participant.objects.filter(purpose="agent", connected_at__isnull=True, ended_at__isnull=False)
    assert rejected_offers.count() > 0  # an agent was offered the conversation and rejected it: not its end
    forget_everything()

    sse_totals = run_sse_worker(len(wire))  # the SSE log holds exactly the wire, in the same order
    through_sse = derived_state()

    assert len(through_sse["conversations"]) == CONVERSATIONS
    assert through_notifications["conversations"] == through_sse["conversations"]
    assert through_notifications["participants"] == through_sse["participants"]
    # Duplicate snapshots and overlapping topics were counted and changed nothing.
    assert notifications_totals.duplicates > sse_totals.duplicates > 0
    assert notifications_totals.rejects == 0 and detail_events > 0


def test_connection_history_is_written_for_each_source(simulator: Simulator, genesys_settings) -> None:  # noqa: ANN001
    settings.GENESYS = replace(genesys_settings, notifications_sync_interval=0.05)
    simulator.notifications.heartbeat_interval = 0.05
    wire = Scenario(seed=5).timeline(2)
    run_notifications_worker(simulator, wire, topics=6)
    run_sse_worker(len(wire))  # the SSE log holds the same wire
    rows = {row.source: row for row in StreamConnection.objects.all()}
    assert sorted(rows) == ["notifications", "sse"] and StreamConnection.objects.count() == 2
    notifications, sse = rows["notifications"], rows["sse"]
    assert notifications.channel_id == simulator.notifications.channel_ids()[0]
    assert notifications.events_received > 0 and notifications.last_event_at is not None
    assert notifications.last_heartbeat_at is not None and notifications.connection_id
    assert notifications.disconnected_at is not None and notifications.disconnect_reason == "worker stopping"
    assert sse.channel_id == "" and sse.events_received == len(wire) and sse.disconnected_at is not None
    assert ":" in notifications.worker and notifications.worker == sse.worker
