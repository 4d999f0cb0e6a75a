"""The Notifications normalizer: conversation snapshots and detail events -> the same typed events as SSE.

The builders below shape messages like Genesys (SDK models QueueConversationEventTopicConversation and the
*DetailEventTopic*Event bodies)."""
from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conversations.derive import ConversationRecord, ParticipantRecord, apply_event, apply_participant, version_of
from conversations.events import EventKind, Reject, TypedEvent
from conversations.normalize_notifications import StaticNames, normalize_notification

BASE = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
CUSTOMER_NUMBER = "tel:+35315550123"
ORG_NUMBER = "tel:+35318880000"


def iso(seconds: float) -> str:
    return (BASE + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def millis(seconds: float) -> int:
    return int((BASE + timedelta(seconds=seconds)).timestamp() * 1000)


def message(topic: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"topicName": topic, "version": "2", "eventBody": body, "metadata": {"CorrelationId": str(uuid.uuid4())}}


def text(msg: dict[str, Any]) -> str:
    return orjson.dumps(msg).decode()


def queue_message(body: dict[str, Any], queue_id: str = "queue-support") -> dict[str, Any]:
    return message(f"v2.routing.queues.{queue_id}.conversations", copy.deepcopy(body))


def call(state: str, *, direction: str = "inbound", connected: float | None = None,
         disconnected: float | None = None, own: str = CUSTOMER_NUMBER, other: str = ORG_NUMBER,
         **extra: Any) -> dict[str, Any]:
    communication: dict[str, Any] = {"id": str(uuid.uuid4()), "state": state, "direction": direction,
                                     "self": {"addressNormalized": own}, "other": {"addressNormalized": other},
                                     "provider": "Edge", **extra}
    if connected is not None:
        communication["connectedTime"] = iso(connected)
    if disconnected is not None:
        communication["disconnectedTime"] = iso(disconnected)
    return communication


def voice_snapshots(cid: str = "conv-1") -> list[dict[str, Any]]:
    """Inbound call: queue -> agent 1 -> transfer to agent 2 in another queue -> end -> wrap-up (agent 2 only)."""
    customer = {"id": f"{cid}-c", "purpose": "customer", "name": "Zoë Ó Briain", "address": CUSTOMER_NUMBER,
                "connectedTime": iso(0), "calls": [call("connected", connected=0)]}
    acd = {"id": f"{cid}-q", "purpose": "acd", "name": "Support", "queueId": "queue-support", "address": ORG_NUMBER,
           "connectedTime": iso(0), "calls": [call("connected", connected=0, own=ORG_NUMBER, other=CUSTOMER_NUMBER)]}
    agent1 = {"id": f"{cid}-a1", "purpose": "agent", "userId": "user-1", "name": "José Müller",
              "queueId": "queue-support", "address": ORG_NUMBER, "wrapupRequired": True,
              "connectedTime": iso(5), "calls": [call("connected", connected=5, own=ORG_NUMBER, other=CUSTOMER_NUMBER)]}
    agent2 = {"id": f"{cid}-a2", "purpose": "agent", "userId": "user-2", "name": "李雷", "queueId": "queue-billing",
              "address": ORG_NUMBER, "wrapupRequired": True, "connectedTime": iso(20),
              "calls": [call("connected", connected=20, own=ORG_NUMBER, other=CUSTOMER_NUMBER)]}
    start = {"id": cid, "participants": [customer, acd]}
    answered = {"id": cid, "participants": [
        customer, _ended(acd, 5), agent1]}
    transferred = {"id": cid, "participants": [
        customer, _ended(acd, 5), {**_ended(agent1, 20), "wrapupRequired": False}, agent2]}
    ended = {"id": cid, "participants": [
        _ended(customer, 60), _ended(acd, 5), {**_ended(agent1, 20), "wrapupRequired": False},
        {**_ended(agent2, 60, acw={"state": "pending", "startTime": iso(60)}), "startAcwTime": iso(60)}]}
    wrapup = {"code": "code-resolved", "notes": "Kundin zufrieden ✓", "durationSeconds": 30, "endTime": iso(90)}
    wrapped = {"id": cid, "participants": [
        _ended(customer, 60, "terminated"), _ended(acd, 5, "terminated"),
        {**_ended(agent1, 20, "terminated"), "wrapupRequired": False},
        {**_ended(agent2, 60, "terminated", acw={"state": "complete", "startTime": iso(60), "endTime": iso(90)}),
         "startAcwTime": iso(60), "endAcwTime": iso(90), "wrapup": wrapup}]}
    return [start, answered, transferred, ended, wrapped]


def _ended(participant: dict[str, Any], at: float, state: str = "disconnected",
           acw: dict[str, Any] | None = None) -> dict[str, Any]:
    ended = copy.deepcopy(participant)
    ended["endTime"] = iso(at)
    for communication in ended.get("calls", []):
        communication["state"] = state
        communication["disconnectedTime"] = iso(at)
        if acw is not None:
            communication["afterCallWork"] = acw
            communication["afterCallWorkRequired"] = True
    return ended


def detail(cid: str, kind: str, seconds: float, **body: Any) -> dict[str, Any]:
    return message(f"v2.detail.events.conversation.{cid}.{kind}", {
        "eventTime": millis(seconds), "conversationId": cid, "sessionId": str(uuid.uuid4()),
        "mediaType": "VOICE", "provider": "Edge", "direction": "INBOUND", "ani": CUSTOMER_NUMBER, "dnis": ORG_NUMBER,
        **body,
    })


def voice_details(cid: str = "conv-1") -> list[dict[str, Any]]:
    return [
        detail(cid, "customer.start", 0, participantId=f"{cid}-c"),
        detail(cid, "acd.start", 0, participantId=f"{cid}-q", queueId="queue-support"),
        detail(cid, "acd.end", 5, participantId=f"{cid}-q", queueId="queue-support", disconnectType="TRANSFER"),
        detail(cid, "user.start", 5, participantId=f"{cid}-a1", queueId="queue-support", userId="user-1"),
        detail(cid, "user.end", 20, participantId=f"{cid}-a1", queueId="queue-support", userId="user-1",
               disconnectType="TRANSFER"),
        detail(cid, "user.start", 20, participantId=f"{cid}-a2", queueId="queue-billing", userId="user-2"),
        detail(cid, "customer.end", 60, participantId=f"{cid}-c", disconnectType="ENDPOINT"),
        detail(cid, "user.end", 60, participantId=f"{cid}-a2", queueId="queue-billing", userId="user-2",
               disconnectType="PEER"),
        detail(cid, "acw", 90, participantId=f"{cid}-a2", queueId="queue-billing", userId="user-2",
               wrapupCode="code-resolved", wrapupNotes="Kundin zufrieden ✓", wrapupDurationMs=30_000),
        detail(cid, "wrapup", 90, participantId=f"{cid}-a2", queueId="queue-billing",
               wrapupCode="code-resolved", wrapupNotes="Kundin zufrieden ✓", wrapupDurationMs=30_000),
    ]


# --- the tests --------------------------------------------------------------------------------------------------

NAMES = StaticNames(queues={"queue-support": "Support Ireland", "queue-billing": "Billing UK"},
                    wrapup_codes={"code-resolved": "Resolved"})


def one(msg: dict[str, Any]) -> TypedEvent:
    items = normalize_notification(text(msg), names=NAMES)
    assert len(items) == 1 and isinstance(items[0], TypedEvent), items
    return items[0]


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


@pytest.mark.parametrize("msg", [
    {"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}},
    {"topicName": "channel.metadata", "eventBody": {"message": "pong"}},
    {"topicName": "v2.system.socket_closing", "eventBody": {"channelId": "streaming-0-x"}},
    {"topicName": "v2.system.no_longer_subscribed.streaming-0-x", "eventBody": {"channelId": "streaming-0-x"}},
])
def test_heartbeats_pongs_and_system_messages_are_not_events(msg: dict[str, Any]) -> None:
    assert normalize_notification(text(msg)) == []


@pytest.mark.parametrize(("raw", "error"), [
    ('{"topicName": "v2.routing.queues.q.conversations", "eventBo', "not a JSON object"),
    ('["v2.routing.queues.q.conversations"]', "not a JSON object"),
    ('{"eventBody": {"id": "c"}}', "topicName"),
    ('{"topicName": "v2.routing.queues.q.conversations", "eventBody": {"participants": []}}', "has no id"),
    ('{"topicName": "v2.routing.queues.q.conversations", "eventBody": "c"}', "eventBody"),
    ('{"topicName": "v2.detail.events.conversation.c.customer.start", "eventBody": {"eventTime": "yesterday"}}',
     "epoch milliseconds"),
    ('{"topicName": "v2.routing.queues.q.conversations", "eventBody": {"id": "c", "participants": '
     '[{"id": "p", "connectedTime": "at nine"}]}}', "not an ISO 8601"),
])
def test_messages_that_cannot_be_stored_are_rejected_with_their_raw_text(raw: str, error: str) -> None:
    [reject] = normalize_notification(raw)
    assert isinstance(reject, Reject) and reject.source == "notifications"
    assert reject.raw == raw and error in reject.error


def test_a_first_snapshot_in_the_queue_is_a_start_with_the_calls_facts() -> None:
    event = one(queue_message(voice_snapshots()[0]))
    assert (event.kind, event.conversation_id, event.source) == (EventKind.START, "conv-1", "notifications")
    assert event.event_type == "conversation.snapshot"
    assert event.started_at == at(0) and event.occurred_at == at(0) and event.ended_at is None
    assert event.facts == {"media_type": "voice", "direction": "inbound", "ani": CUSTOMER_NUMBER,
                           "dnis": ORG_NUMBER, "queue_id": "queue-support", "queue_name": "Support Ireland"}


def test_an_answered_call_is_an_update_naming_its_agent() -> None:
    event = one(queue_message(voice_snapshots()[1]))
    assert event.kind is EventKind.UPDATE and event.occurred_at == at(5)
    assert event.facts["agent_id"] == "user-1" and event.facts["agent_name"] == "José Müller"


def test_after_a_transfer_the_queue_and_agent_are_those_of_the_latest_agent() -> None:
    event = one(queue_message(voice_snapshots()[2], "queue-billing"))
    assert event.kind is EventKind.UPDATE and event.occurred_at == at(20)
    assert (event.facts["queue_id"], event.facts["queue_name"]) == ("queue-billing", "Billing UK")
    assert (event.facts["agent_id"], event.facts["agent_name"]) == ("user-2", "李雷")


def test_the_customer_leaving_ends_the_conversation_while_after_call_work_is_pending() -> None:
    event = one(queue_message(voice_snapshots()[3]))
    assert event.kind is EventKind.END and event.ended_at == at(60) and event.wrapped_up_at is None


def test_the_wrapup_snapshot_says_when_and_how_the_conversation_was_wrapped_up() -> None:
    event = one(queue_message(voice_snapshots()[4]))
    assert event.kind is EventKind.WRAPUP
    assert (event.started_at, event.ended_at, event.wrapped_up_at, event.occurred_at) == (at(0), at(60), at(90), at(90))
    assert event.facts["wrapup_code"] == "code-resolved" and event.facts["wrapup_name"] == "Resolved"
    assert event.facts["wrapup_notes"] == "Kundin zufrieden ✓"
    agent = next(p for p in event.participants if p.participant_id == "conv-1-a2")
    assert (agent.purpose, agent.user_id, agent.queue_id) == ("agent", "user-2", "queue-billing")
    assert (agent.connected_at, agent.ended_at) == (at(20), at(60))
    assert (agent.wrapup_code, agent.wrapup_notes, agent.acw_seconds) == ("code-resolved", "Kundin zufrieden ✓", 30)


def test_a_pending_wrapup_of_any_agent_holds_the_conversation_at_ended() -> None:
    body = copy.deepcopy(voice_snapshots()[4])
    body["participants"][2]["wrapupRequired"] = True  # the transferred agent still owes a wrap-up
    assert one(queue_message(body)).kind is EventKind.END


def test_an_outbound_call_swaps_ani_and_dnis_and_starts_before_the_customer_answers() -> None:
    agent = {"id": "o-a", "purpose": "agent", "userId": "user-1", "name": "Ciarán O'Connor", "queueId": "queue-support",
             "address": ORG_NUMBER, "connectedTime": iso(0),
             "calls": [call("connected", direction="outbound", connected=0, own=ORG_NUMBER, other=CUSTOMER_NUMBER)]}
    customer = {"id": "o-c", "purpose": "customer", "address": CUSTOMER_NUMBER,
                "calls": [call("alerting", direction="outbound")]}
    event = one(queue_message({"id": "out-1", "participants": [customer, agent]}))
    assert event.kind is EventKind.START and event.started_at == at(0)
    assert (event.facts["direction"], event.facts["ani"], event.facts["dnis"]) == ("outbound", ORG_NUMBER,
                                                                                     CUSTOMER_NUMBER)


def test_a_chat_is_inbound_without_numbers() -> None:
    customer = {"id": "h-c", "purpose": "customer", "name": "王芳", "connectedTime": iso(0),
                "chats": [{"id": "s", "state": "connected", "connectedTime": iso(0)}]}
    acd = {"id": "h-q", "purpose": "acd", "queueId": "queue-support", "name": "Support", "connectedTime": iso(0),
           "chats": [{"id": "s2", "state": "connected", "connectedTime": iso(0)}]}
    event = one(queue_message({"id": "chat-1", "participants": [customer, acd]}))
    assert event.facts["media_type"] == "chat" and event.facts["direction"] == "inbound"
    assert "ani" not in event.facts and "dnis" not in event.facts


def test_a_callbacks_other_end_is_its_caller_id() -> None:
    customer = {"id": "b-c", "purpose": "customer", "address": CUSTOMER_NUMBER, "connectedTime": iso(0),
                "callbacks": [{"id": "s", "state": "connected", "direction": "outbound", "connectedTime": iso(0),
                               "callbackNumbers": [CUSTOMER_NUMBER], "callerId": ORG_NUMBER}]}
    event = one(queue_message({"id": "cb-1", "participants": [customer]}))
    assert (event.facts["media_type"], event.facts["ani"], event.facts["dnis"]) == ("callback", ORG_NUMBER,
                                                                                      CUSTOMER_NUMBER)


def test_the_same_snapshot_on_a_queue_topic_and_a_user_topic_has_one_dedupe_key() -> None:
    body = voice_snapshots()[2]
    on_queue = one(queue_message(body, "queue-support"))
    on_other_queue = one(queue_message(body, "queue-billing"))
    on_user = one(message("v2.users.user-2.conversations", copy.deepcopy(body)))
    on_calls = one(message("v2.routing.queues.queue-billing.conversations.calls", copy.deepcopy(body)))
    assert len({on_queue.dedupe_key, on_other_queue.dedupe_key, on_user.dedupe_key, on_calls.dedupe_key}) == 1
    assert on_user.payload["topicName"] == "v2.users.user-2.conversations"  # the raw message is what is kept


def test_detail_events_read_epoch_millis_and_lowercase_their_enums() -> None:
    event = one(detail("conv-1", "customer.start", 0.123, participantId="conv-1-c"))
    assert (event.kind, event.event_type, event.occurred_at) == (EventKind.START, "detail.customer.start", at(0.123))
    assert event.facts == {"media_type": "voice", "direction": "inbound", "ani": CUSTOMER_NUMBER, "dnis": ORG_NUMBER}
    assert event.participants[0].purpose == "customer"


def test_customer_end_ends_the_conversation_but_user_end_on_a_requeue_does_not() -> None:
    requeue = one(detail("conv-1", "user.end", 15, participantId="conv-1-a0", userId="user-9",
                         queueId="queue-support", disconnectType="ENDPOINT"))
    assert requeue.kind is EventKind.UPDATE and requeue.ended_at is None
    assert requeue.participants[0].ended_at == at(15) and requeue.participants[0].purpose == "agent"
    end = one(detail("conv-1", "customer.end", 60, participantId="conv-1-c", disconnectType="ENDPOINT"))
    assert end.kind is EventKind.END and end.occurred_at == at(60)


def test_the_acw_detail_event_carries_the_wrapup_code_notes_and_duration() -> None:
    event = one(voice_details()[8])
    assert event.kind is EventKind.UPDATE  # one agent's wrap-up; the snapshot says when the conversation is done
    assert (event.facts["wrapup_code"], event.facts["wrapup_name"]) == ("code-resolved", "Resolved")
    assert event.participants[0].acw_seconds == 30 and event.participants[0].wrapup_notes == "Kundin zufrieden ✓"


def test_an_unknown_detail_type_and_an_unknown_topic_are_kept_as_unknown_events() -> None:
    flow = one(detail("conv-1", "voicemail.start", 3))
    assert flow.kind is EventKind.UNKNOWN and flow.conversation_id == "conv-1"
    other = one(message("v2.users.user-1.presence", {"id": "user-1", "presenceDefinition": {"systemPresence": "Busy"}}))
    assert other.kind is EventKind.UNKNOWN and other.event_type == "v2.users.user-1.presence"


ALL = [one(queue_message(body)) for body in voice_snapshots()] + [one(m) for m in voice_details()]


def fold(events: list[TypedEvent]) -> tuple[ConversationRecord, dict[str, dict[str, Any]]]:
    record = ConversationRecord("conv-1")
    participants: dict[str, ParticipantRecord] = {}
    for event in events:
        apply_event(record, event)
        for facts in event.participants:
            apply_participant(participants.setdefault(facts.participant_id, ParticipantRecord(facts.participant_id)),
                              facts, version_of(event))
    return record, {pid: p.attrs for pid, p in participants.items()}


def test_snapshots_and_detail_events_fold_into_the_sse_equivalent_state() -> None:
    record, participants = fold(ALL)
    assert record.state == "wrapped_up"
    assert (record.started_at, record.ended_at, record.wrapped_up_at, record.last_event_at) == (
        at(0), at(60), at(90), at(90))
    assert {k: record.attrs[k] for k in ("queue_id", "agent_id", "agent_name", "wrapup_code", "direction")} == {
        "queue_id": "queue-billing", "agent_id": "user-2", "agent_name": "李雷", "wrapup_code": "code-resolved",
        "direction": "inbound"}
    assert participants["conv-1-a1"]["ended_at"] == at(20)


@given(st.lists(st.sampled_from(ALL), max_size=10).flatmap(lambda extra: st.permutations(ALL + extra)))
def test_duplicates_and_any_order_change_nothing(events: list[TypedEvent]) -> None:
    assert fold(events) == fold(ALL)
