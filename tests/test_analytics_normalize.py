"""Analytics records -> typed events with source "backfill": the lifecycle (start, end, wrap-up) and the facts
read from conversationStart/conversationEnd, participants, sessions and segments."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import orjson

from conversations.events import EventKind, Reject, TypedEvent
from conversations.genesys.scenario import QUEUES, WRAPUP_CODE_NAMES, Scenario
from conversations.genesys.simulator_analytics import analytics_conversation
from conversations.normalize import normalize_sse
from conversations.normalize_analytics import normalize_conversation, overlaps
from conversations.normalize_notifications import StaticNames

NAMES = StaticNames(queues={q.id: q.name for q in QUEUES}, wrapup_codes=WRAPUP_CODE_NAMES)


def event(record: dict[str, Any]) -> TypedEvent:
    item = normalize_conversation(record, names=NAMES)
    assert isinstance(item, TypedEvent), item
    return item


def lifecycle(seed: int, **kwargs: Any) -> list[dict[str, Any]]:
    return Scenario(seed, **kwargs).lifecycle()


def time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_each_moment_of_a_conversation_gives_its_kind_and_explicit_times() -> None:
    payloads = lifecycle(1)
    start, end, wrapup = payloads[0], payloads[-2], payloads[-1]
    kinds = [event(analytics_conversation(p)).kind for p in payloads]
    assert kinds[-2:] == [EventKind.END, EventKind.WRAPUP]
    assert set(kinds[:-2]) <= {EventKind.START, EventKind.UPDATE}
    done = event(analytics_conversation(wrapup))
    assert done.started_at == time(start["timestamp"]) and done.ended_at == time(end["timestamp"])
    assert done.wrapped_up_at == time(wrapup["timestamp"]) == done.occurred_at
    ended = event(analytics_conversation(end))
    assert ended.ended_at == time(end["timestamp"])
    assert ended.wrapped_up_at is None  # after-call work still open
    assert done.source == "backfill" and done.event_type == "analytics.conversation"


def test_the_facts_are_those_the_sse_stream_states() -> None:
    for seed in range(12):
        wrapup = lifecycle(seed, reject_rate=0.5)[-1]
        facts = event(analytics_conversation(wrapup)).facts
        stream = normalize_sse(orjson.dumps(wrapup).decode())
        assert isinstance(stream, TypedEvent)
        assert facts == stream.facts, seed


def test_an_agent_who_rejected_the_offer_is_not_the_end_and_never_connected() -> None:
    connect = next(p for seed in range(40) for p in lifecycle(seed, reject_rate=1.0)
                   if p["eventType"] == "conversation:update" and any(
                       a.get("purpose") == "agent" and "connectedTime" not in a for a in p["participants"]))
    item = event(analytics_conversation(connect))
    rejected = next(p for p in item.participants if p.purpose == "agent" and p.connected_at is None)
    assert rejected.ended_at is not None and item.kind is EventKind.UPDATE and item.ended_at is None


def test_the_participants_carry_the_wrap_up_and_after_call_work() -> None:
    wrapup = lifecycle(3)[-1]
    item = event(analytics_conversation(wrapup))
    agent = next(p for p in item.participants if p.wrapup_code)
    assert agent.wrapup_code == wrapup["wrapup"]["code"]
    assert agent.acw_seconds == wrapup["wrapup"]["durationSeconds"]


def test_the_same_record_twice_has_one_dedupe_key_and_a_richer_record_another() -> None:
    payloads = lifecycle(2)
    first = analytics_conversation(payloads[-2])
    assert event(first).dedupe_key == event(copy.deepcopy(first)).dedupe_key
    assert event(analytics_conversation(payloads[-1])).dedupe_key != event(first).dedupe_key


def test_a_record_that_cannot_be_read_is_kept_as_a_reject() -> None:
    for record in ({"participants": []}, {"conversationId": "c-1"}, ["not", "a", "record"],
                   {"conversationId": "c-1", "conversationStart": "yesterday"}):
        item = normalize_conversation(record)
        assert isinstance(item, Reject) and item.source == "backfill" and item.raw


def test_a_conversation_overlaps_a_window_it_started_ended_or_was_wrapped_up_in() -> None:
    payloads = lifecycle(4)
    start, end, wrapup = (time(p["timestamp"]) for p in (payloads[0], payloads[-2], payloads[-1]))
    done, going = analytics_conversation(payloads[-1]), analytics_conversation(payloads[-2])  # going: in ACW
    hour, ms = timedelta(hours=1), timedelta(milliseconds=1)
    assert overlaps(done, start - hour, start) and not overlaps(done, start - hour, start - ms)
    assert overlaps(done, wrapup, wrapup + hour) and not overlaps(done, wrapup + ms, wrapup + hour)
    assert overlaps(done, end + ms, wrapup - ms)  # ended before the window, wrapped up after it
    assert overlaps(going, end + hour, end + 2 * hour)  # not over yet: it overlaps any later window
    assert overlaps({"conversationId": "broken"}, start, end)  # kept, to be stored as a reject
