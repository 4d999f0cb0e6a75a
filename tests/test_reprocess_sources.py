"""Reprocessing uses the normalizer of the source a reject came from, not always the SSE one."""
from __future__ import annotations

import orjson
import pytest

from conversations.genesys.simulator import Simulator
from conversations.models import Conversation, Event, RejectedEvent
from conversations.reprocess import reprocess_rejects

pytestmark = pytest.mark.django_db


def reject(source: str, raw: str) -> RejectedEvent:
    return RejectedEvent.objects.create(source=source, raw=raw, error="an older normalizer refused it",
                                        received_at="2026-11-28T09:00:00Z")


def test_a_backfill_reject_is_reprocessed_as_an_analytics_record() -> None:
    sim = Simulator(seed=3)
    sim.generate(1)
    record = sim.analytics.conversations()[0]
    result = reprocess_rejects([reject("backfill", orjson.dumps(record).decode())])
    assert (result.reprocessed, result.new_events, result.still_failing) == (1, 1, 0)
    assert Event.objects.get().source == "backfill"
    assert Conversation.objects.get().conversation_id == record["conversationId"]


def test_a_notifications_reject_is_reprocessed_as_a_websocket_message() -> None:
    sim = Simulator(seed=4)
    payload = sim.generate(1)[0]
    message = {"topicName": f"v2.detail.events.conversation.{payload['conversationId']}.customer.start",
               "version": "2", "eventBody": {"eventTime": 1764320400000, "conversationId": payload["conversationId"],
                                             "participantId": "p-1", "sessionId": "s-1", "mediaType": "VOICE",
                                             "direction": "INBOUND"}}
    result = reprocess_rejects([reject("notifications", orjson.dumps(message).decode())])
    assert (result.reprocessed, result.new_events, result.still_failing) == (1, 1, 0)
    assert Event.objects.get().source == "notifications"


def test_a_reject_that_still_fails_keeps_its_raw_text_and_gets_the_new_error() -> None:
    stored = reject("backfill", '{"conversationId": ')
    result = reprocess_rejects([stored])
    stored.refresh_from_db()
    assert result.still_failing == 1 and stored.raw == '{"conversationId": ' and "JSONDecodeError" in stored.error
