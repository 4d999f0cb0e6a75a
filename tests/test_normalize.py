from __future__ import annotations

import orjson
import pytest

from conversations.events import EventKind, Reject, TypedEvent
from conversations.normalize import dedupe_key, normalize_sse

from tests.factories import lifecycle, payload


@pytest.mark.parametrize("data", ["", "  ", "{}", " {} "])
def test_keepalives_are_neither_events_nor_rejects(data: str) -> None:
    assert normalize_sse(data) is None


def test_a_start_event_becomes_a_typed_start_with_its_facts() -> None:
    raw = lifecycle("conv-1")[0]
    event = normalize_sse(orjson.dumps(raw).decode(), sse_id="41")
    assert isinstance(event, TypedEvent)
    assert (event.kind, event.conversation_id, event.source, event.sse_id) == (EventKind.START, "conv-1", "sse", "41")
    assert event.occurred_at.isoformat() == "2026-11-28T09:00:00+00:00"
    assert event.facts["media_type"] == "voice" and event.facts["queue_name"] == "Support"
    assert event.participants[0].name == "Zoë Ó Briain"
    assert event.payload == raw


def test_malformed_json_is_rejected_with_its_raw_text() -> None:
    reject = normalize_sse('{"eventType": "conversation:start", "conver', sse_id="9")
    assert isinstance(reject, Reject)
    assert reject.raw == '{"eventType": "conversation:start", "conver' and reject.sse_id == "9"
    assert "JSONDecodeError" in reject.error


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('{"conversationId": "c", "timestamp": "2026-11-28T09:00:00Z"}', "eventType is missing"),
        ('{"eventType": "conversation:end", "timestamp": "2026-11-28T09:00:00Z"}', "conversationId is missing"),
        ('{"eventType": "conversation:end", "conversationId": "c", "timestamp": "yesterday"}', "not an ISO 8601"),
    ],
)
def test_payloads_that_cannot_be_stored_are_rejected_with_a_reason(data: str, message: str) -> None:
    reject = normalize_sse(data)
    assert isinstance(reject, Reject) and message in reject.error and reject.raw == data


def test_an_unknown_event_type_is_kept_as_unknown() -> None:
    event = normalize_sse('{"eventType": "conversation:transfer", "conversationId": "c", "timestamp": "2026-11-28T09:00:00Z"}')
    assert isinstance(event, TypedEvent) and event.kind is EventKind.UNKNOWN and event.event_type == "conversation:transfer"


def test_an_unknown_event_without_conversation_or_time_is_still_kept() -> None:
    event = normalize_sse('{"eventType": "agent:presence", "agent": "x"}')
    assert isinstance(event, TypedEvent) and event.kind is EventKind.UNKNOWN and event.conversation_id == ""


def test_the_dedupe_key_ignores_key_order_and_whitespace_but_not_source_or_data() -> None:
    p = payload("end", "c1", 10)
    reordered = dict(reversed(list(p.items())))
    assert dedupe_key("sse", p) == dedupe_key("sse", reordered)
    spaced = normalize_sse(orjson.dumps(p, option=orjson.OPT_INDENT_2).decode())
    assert isinstance(spaced, TypedEvent) and spaced.dedupe_key == dedupe_key("sse", p)
    assert dedupe_key("backfill", p) != dedupe_key("sse", p)
    assert dedupe_key("sse", {**p, "timestamp": "2026-11-28T09:00:11.000Z"}) != dedupe_key("sse", p)


def test_the_sse_id_is_not_part_of_the_dedupe_key() -> None:
    data = orjson.dumps(payload("end", "c1", 10)).decode()
    first, second = normalize_sse(data, sse_id="1"), normalize_sse(data, sse_id="77")
    assert isinstance(first, TypedEvent) and isinstance(second, TypedEvent)
    assert first.dedupe_key == second.dedupe_key
