"""Order independence, proven with hypothesis: any order of the same events, with any duplicates, gives the same
rows, in memory (the fold) and in the database (the batch writer)."""
from __future__ import annotations

import pytest
from django.forms.models import model_to_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversations import services
from conversations.derive import ConversationRecord, apply_event
from conversations.models import Conversation, Event, Participant

from tests.factories import lifecycle, payload, typed

EVENTS = [typed(p) for p in lifecycle("conv-a") + lifecycle("conv-b", offset=7)] + [
    typed(payload("update", "conv-a", 20, queueId="queue-tie")),  # same time as a transfer: the key breaks the tie
    typed(payload("update", "conv-b", 50, direction="outbound")),
    typed({"eventType": "conversation:hold", "conversationId": "conv-a", "timestamp": "2026-11-28T09:00:03Z"}),
]


def fold(events) -> dict[str, ConversationRecord]:  # noqa: ANN001
    records: dict[str, ConversationRecord] = {}
    for event in events:
        apply_event(records.setdefault(event.conversation_id, ConversationRecord(event.conversation_id)), event)
    return records


shuffled_with_duplicates = st.lists(st.sampled_from(EVENTS), min_size=0, max_size=12).flatmap(
    lambda extra: st.permutations(EVENTS + extra)
)


@given(shuffled_with_duplicates)
def test_the_fold_gives_the_same_state_for_any_order_and_duplicates(events) -> None:  # noqa: ANN001
    assert fold(events) == fold(EVENTS)


def snapshot() -> dict:
    conversations = {
        c.conversation_id: model_to_dict(c, exclude=["id"]) for c in Conversation.objects.all()
    }
    participants = sorted(
        repr((p.conversation.conversation_id, sorted(model_to_dict(p, exclude=["id", "conversation"]).items())))
        for p in Participant.objects.select_related("conversation")
    )
    return {"conversations": conversations, "participants": repr(participants), "events": Event.objects.count()}


@pytest.mark.django_db(transaction=True)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=shuffled_with_duplicates, batch_size=st.integers(min_value=1, max_value=8))
def test_the_database_rows_are_the_same_for_any_order_duplicates_and_batching(order, batch_size) -> None:  # noqa: ANN001
    Conversation.objects.all().delete()
    Event.objects.all().delete()
    services.ingest_batch(events=EVENTS, source="sse")
    expected = snapshot()
    Conversation.objects.all().delete()
    Event.objects.all().delete()
    for start in range(0, len(order), batch_size):
        services.ingest_batch(events=order[start:start + batch_size], source="sse")
    assert snapshot() == expected
    assert expected["events"] == len(EVENTS)
