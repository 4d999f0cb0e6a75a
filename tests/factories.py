"""Small builders for SSE payloads and typed events used across the tests, and waiting for a condition."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from conversations.events import TypedEvent
from conversations.normalize import normalize_sse

import orjson

BASE_TIME = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def payload(event_type: str, conversation_id: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "eventType": f"conversation:{event_type}",
        "conversationId": conversation_id,
        "timestamp": iso(BASE_TIME + timedelta(seconds=seconds)),
        **extra,
    }


def lifecycle(conversation_id: str | None = None, *, offset: float = 0.0) -> list[dict[str, Any]]:
    """start -> update (agent joins) -> update (transfer) -> end -> wrapup, with non-ASCII names."""
    cid = conversation_id or str(uuid.uuid4())
    customer = {"participantId": f"{cid}-c", "purpose": "customer", "name": "Zoë Ó Briain"}
    agent = {"participantId": f"{cid}-a1", "purpose": "agent", "userId": "user-1", "name": "José Müller",
             "queueId": "queue-support", "connectedTime": iso(BASE_TIME + timedelta(seconds=offset + 5))}
    agent2 = {"participantId": f"{cid}-a2", "purpose": "agent", "userId": "user-2", "name": "李雷",
              "queueId": "queue-billing", "connectedTime": iso(BASE_TIME + timedelta(seconds=offset + 20))}
    common = {"mediaType": "voice", "direction": "inbound", "ani": "tel:+35315550123", "dnis": "tel:+35318880000"}
    return [
        payload("start", cid, offset, queueId="queue-support", queueName="Support", participants=[customer], **common),
        payload("update", cid, offset + 5, queueId="queue-support", participants=[customer, agent], **common),
        payload("update", cid, offset + 20, queueId="queue-billing", queueName="Billing",
                participants=[customer, {**agent, "endTime": iso(BASE_TIME + timedelta(seconds=offset + 20))},
                              agent2], **common),
        payload("end", cid, offset + 60, participants=[
            {**customer, "endTime": iso(BASE_TIME + timedelta(seconds=offset + 60))},
            {**agent2, "endTime": iso(BASE_TIME + timedelta(seconds=offset + 60))}], **common),
        payload("wrapup", cid, offset + 90,
                wrapup={"code": "code-resolved", "name": "Resolved", "notes": "Kundin zufrieden ✓",
                        "durationSeconds": 30}),
    ]


def typed(p: dict[str, Any], *, sse_id: str | None = None) -> TypedEvent:
    event = normalize_sse(orjson.dumps(p).decode(), sse_id=sse_id)
    assert isinstance(event, TypedEvent), event
    return event


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until `predicate` returns something true and return it; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
