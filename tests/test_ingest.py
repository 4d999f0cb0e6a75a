"""The batch writer: raw events, derived state, participants, rejects, checkpoint and signals."""
from __future__ import annotations

import pytest
from django.db.models.signals import ModelSignal  # noqa: F401  (import check only)

from conversations import services, signals
from conversations.events import Reject
from conversations.models import Conversation, Event, Participant, RejectedEvent, StreamCheckpoint

from tests.factories import lifecycle, payload, typed

pytestmark = pytest.mark.django_db


def ingest(payloads, **kwargs):  # noqa: ANN001, ANN201
    return services.ingest_batch(events=[typed(p) for p in payloads], source="sse", **kwargs)


def test_a_full_lifecycle_derives_the_conversation_and_its_participants() -> None:
    ingest(lifecycle("conv-1"))
    conv = Conversation.objects.get(conversation_id="conv-1")
    assert conv.state == "wrapped_up"
    assert (conv.media_type, conv.direction, conv.ani, conv.dnis) == ("voice", "inbound", "tel:+35315550123",
                                                                      "tel:+35318880000")
    assert (conv.queue_id, conv.queue_name) == ("queue-billing", "Billing")
    assert (conv.agent_id, conv.agent_name) == ("user-2", "李雷")
    assert (conv.wrapup_code, conv.wrapup_name, conv.wrapup_notes) == ("code-resolved", "Resolved",
                                                                       "Kundin zufrieden ✓")
    assert conv.started_at.isoformat() == "2026-11-28T09:00:00+00:00"
    assert conv.ended_at.isoformat() == "2026-11-28T09:01:00+00:00"
    assert conv.wrapped_up_at.isoformat() == "2026-11-28T09:01:30+00:00"
    agents = {p.name: p for p in Participant.objects.filter(conversation=conv, purpose="agent")}
    assert set(agents) == {"José Müller", "李雷"}
    assert agents["José Müller"].ended_at.isoformat() == "2026-11-28T09:00:20+00:00"
    assert agents["李雷"].queue_id == "queue-billing"
    assert Event.objects.count() == 5


def test_a_duplicate_event_is_stored_once_and_counted() -> None:
    events = lifecycle("conv-1")
    first = ingest(events[:2])
    second = ingest([events[1], events[1], events[2]])
    assert (len(first.new_events), first.duplicates) == (2, 0)
    assert (len(second.new_events), second.duplicates) == (1, 2)
    assert Event.objects.count() == 3


def test_state_never_moves_backwards() -> None:
    events = lifecycle("conv-1")
    ingest([events[4]])
    ingest([events[3]])
    ingest(events[:3])
    conv = Conversation.objects.get()
    assert conv.state == "wrapped_up" and conv.queue_name == "Billing"
    assert conv.started_at.isoformat() == "2026-11-28T09:00:00+00:00"


def test_an_unknown_event_is_stored_but_moves_no_conversation() -> None:
    result = ingest([{"eventType": "conversation:transfer", "conversationId": "c9",
                      "timestamp": "2026-11-28T09:00:00Z"}])
    assert len(result.new_events) == 1 and Event.objects.get().kind == "unknown"
    assert not Conversation.objects.exists()


def test_rejects_are_stored_with_their_raw_text() -> None:
    services.ingest_batch(events=[], rejects=[Reject(source="sse", raw="{bad", error="JSONDecodeError", sse_id="3")],
                          source="sse", last_event_id="3")
    reject = RejectedEvent.objects.get()
    assert (reject.raw, reject.sse_id, reject.source) == ("{bad", "3", "sse")


def test_the_checkpoint_moves_with_each_batch_and_counts_what_was_committed() -> None:
    events = lifecycle("conv-1")
    ingest(events[:2], last_event_id="2")
    ingest(events[2:], last_event_id="5")
    ingest([], last_event_id=None)
    checkpoint = StreamCheckpoint.objects.get(source="sse")
    assert (checkpoint.last_event_id, checkpoint.events_committed) == ("5", 5)
    assert services.load_checkpoint(source="sse") == "5"
    assert services.load_checkpoint(source="other") is None


def test_signals_fire_once_per_new_event_with_the_conversation() -> None:
    received: list[tuple[str, str, str]] = []

    def listener(signal, sender, event, conversation, **kwargs):  # noqa: ANN001, ANN202
        received.append((signal_names[signal], event.conversation_id, conversation.state))

    signal_names = {signals.conversation_started: "started", signals.conversation_updated: "updated",
                    signals.conversation_ended: "ended", signals.conversation_wrapped_up: "wrapped_up"}
    for signal in signal_names:
        signal.connect(listener, weak=False)
    try:
        events = lifecycle("conv-1")
        ingest(events[:4])
        ingest([events[3], events[4]])  # the duplicate end sends nothing
    finally:
        for signal in signal_names:
            signal.disconnect(listener)
    assert [r[0] for r in received] == ["started", "updated", "updated", "ended", "wrapped_up"]
    assert received[3] == ("ended", "conv-1", "ended")


def test_stream_error_is_sent_for_each_reject() -> None:
    seen = []
    signals.stream_error.connect(lambda sender, reject, **kw: seen.append(reject.raw), weak=False)
    try:
        services.ingest_batch(events=[], rejects=[Reject(source="sse", raw="x", error="e")], source="sse")
    finally:
        signals.stream_error.receivers.clear()
    assert seen == ["x"]


def test_transitions_report_the_states_a_batch_moved_conversations_through() -> None:
    events = lifecycle("conv-1")
    first = ingest(events[:3])
    second = ingest(events[3:])
    assert [(t.old_state, t.new_state) for t in first.transitions] == [("", "active")]
    assert [(t.old_state, t.new_state) for t in second.transitions] == [("active", "wrapped_up")]


def test_the_newest_statement_of_an_attribute_wins_even_when_it_arrives_first() -> None:
    newer = payload("update", "c1", 30, queueId="queue-new")
    older = payload("update", "c1", 10, queueId="queue-old")
    ingest([newer])
    ingest([older])
    assert Conversation.objects.get().queue_id == "queue-new"
