"""`manage.py prune_events --older-than`: raw rows past retention go, conversations stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from conversations import services
from conversations.models import Conversation, Event, Participant, RejectedEvent, StreamConnection

from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


@pytest.fixture
def history() -> None:
    """Two wrapped-up conversations, one of last year and one of yesterday, plus rejects and connections."""
    for cid in ("conv-old", "conv-new"):
        services.ingest_batch(events=[typed(p) for p in lifecycle(cid)], source="sse")
    Event.objects.filter(conversation_id="conv-old").update(occurred_at=days_ago(400))
    Event.objects.filter(conversation_id="conv-new").update(occurred_at=days_ago(1))
    for age in (200, 100, 2):
        RejectedEvent.objects.create(source="sse", raw="{", error="malformed", received_at=days_ago(age))
    StreamConnection.objects.create(source="sse", connected_at=days_ago(120), disconnected_at=days_ago(119))
    StreamConnection.objects.create(source="sse", connected_at=days_ago(95))  # still open: kept
    StreamConnection.objects.create(source="sse", connected_at=days_ago(3), disconnected_at=days_ago(2))


def prune(*args: str) -> list[str]:
    out = StringIO()
    call_command("prune_events", *args, stdout=out)
    return out.getvalue().splitlines()


def test_old_events_rejects_and_closed_connections_go_and_conversations_stay(history: None) -> None:
    lines = prune("--older-than", "90d", "--batch-size", "2")
    assert lines[1:] == [
        "events: deleted 5",
        "rejected events: deleted 2",
        "stream connections: deleted 1",
        "conversations kept: 2",
    ]
    assert set(Event.objects.values_list("conversation_id", flat=True)) == {"conv-new"}
    assert RejectedEvent.objects.count() == 1 and StreamConnection.objects.count() == 2
    old = Conversation.objects.get(conversation_id="conv-old")
    assert (old.state, old.wrapup_name, old.queue_name) == ("wrapped_up", "Resolved", "Billing")
    assert Participant.objects.filter(conversation=old).count() == 3


def test_a_dry_run_counts_and_deletes_nothing(history: None) -> None:
    lines = prune("--older-than", "90", "--dry-run")
    assert lines[1:4] == [
        "events: would delete 5",
        "rejected events: would delete 2",
        "stream connections: would delete 1",
    ]
    assert Event.objects.count() == 10 and RejectedEvent.objects.count() == 3


def test_a_second_run_finds_nothing_more(history: None) -> None:
    prune("--older-than", "90d")
    assert prune("--older-than", "90d")[1:4] == [
        "events: deleted 0",
        "rejected events: deleted 0",
        "stream connections: deleted 0",
    ]


def test_a_later_duplicate_of_a_pruned_event_leaves_the_conversation_as_it_was(history: None) -> None:
    before = Conversation.objects.values().get(conversation_id="conv-old")
    prune("--older-than", "90d")
    services.ingest_batch(events=[typed(p) for p in lifecycle("conv-old")[2:]], source="sse")
    after = Conversation.objects.values().get(conversation_id="conv-old")
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }


@pytest.mark.parametrize("age", ["ninety", "0d", "-5", "3w"])
def test_an_age_that_is_not_days_is_refused(age: str) -> None:
    with pytest.raises(CommandError, match="--older-than"):
        call_command("prune_events", "--older-than", age)
