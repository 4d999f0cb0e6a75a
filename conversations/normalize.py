"""Wire messages -> typed events. Knows the payload shapes, nothing about the database."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

from conversations.events import EventKind, ParticipantFacts, Reject, TypedEvent

SSE_KINDS: dict[str, EventKind] = {
    "conversation:start": EventKind.START,
    "conversation:update": EventKind.UPDATE,
    "conversation:end": EventKind.END,
    "conversation:wrapup": EventKind.WRAPUP,
}
# SSE payload key -> conversation attribute.
SSE_FACTS: dict[str, str] = {
    "mediaType": "media_type",
    "direction": "direction",
    "queueId": "queue_id",
    "queueName": "queue_name",
    "ani": "ani",
    "dnis": "dnis",
}


class PayloadError(ValueError):
    """The payload is well-formed JSON but not an event we can store."""


def dedupe_key(source: str, payload: dict[str, Any]) -> str:
    """A stable hash of the source and the event's data; key order and whitespace do not matter."""
    canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(source.encode() + b"\0" + canonical, digest_size=20).hexdigest()


def parse_time(value: Any, *, field: str) -> datetime:
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{field} is missing or not a string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"{field}={value!r} is not an ISO 8601 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def optional_time(value: Any, *, field: str) -> datetime | None:
    return None if value in (None, "") else parse_time(value, field=field)


def is_keepalive(data: str) -> bool:
    """Keep-alives arrive as comments (never dispatched), empty data or `{}`: not events, not errors."""
    stripped = data.strip()
    return stripped == "" or stripped == "{}"


def normalize_sse(data: str, *, sse_id: str | None = None, source: str = "sse") -> TypedEvent | Reject | None:
    """One SSE message's data -> a typed event, a reject (kept with its raw text), or None for a keep-alive."""
    if is_keepalive(data):
        return None
    try:
        payload = orjson.loads(data)
        if not isinstance(payload, dict):
            raise PayloadError(f"expected a JSON object, got {type(payload).__name__}")
        return sse_event(payload, sse_id=sse_id, source=source)
    except (orjson.JSONDecodeError, PayloadError) as exc:
        return Reject(source=source, raw=data, error=f"{type(exc).__name__}: {exc}", sse_id=sse_id)


def sse_event(payload: dict[str, Any], *, sse_id: str | None, source: str) -> TypedEvent:
    event_type = payload.get("eventType")
    if not isinstance(event_type, str) or not event_type:
        raise PayloadError("eventType is missing")
    kind = SSE_KINDS.get(event_type, EventKind.UNKNOWN)
    conversation_id = payload.get("conversationId")
    if kind is EventKind.UNKNOWN:
        # Unknown types are kept whatever they carry; they never move a conversation.
        conversation_id = conversation_id if isinstance(conversation_id, str) else ""
        occurred_at = _unknown_time(payload.get("timestamp"))
    else:
        if not isinstance(conversation_id, str) or not conversation_id:
            raise PayloadError("conversationId is missing")
        occurred_at = parse_time(payload.get("timestamp"), field="timestamp")
    return TypedEvent(
        kind=kind,
        conversation_id=conversation_id,
        occurred_at=occurred_at,
        source=source,
        event_type=event_type,
        dedupe_key=dedupe_key(source, payload),
        payload=payload,
        sse_id=sse_id,
        facts=sse_facts(payload),
        participants=tuple(sse_participant(p) for p in payload.get("participants") or () if _has_id(p)),
    )


def _unknown_time(value: Any) -> datetime:
    try:
        return parse_time(value, field="timestamp")
    except PayloadError:
        return datetime.now(UTC)


def _has_id(participant: Any) -> bool:
    return isinstance(participant, dict) and isinstance(participant.get("participantId"), str)


def sse_facts(payload: dict[str, Any]) -> dict[str, Any]:
    facts = {attr: payload[key] for key, attr in SSE_FACTS.items() if isinstance(payload.get(key), str)}
    wrapup = payload.get("wrapup")
    if isinstance(wrapup, dict):
        if wrapup.get("code"):
            facts["wrapup_code"] = str(wrapup["code"])
        if wrapup.get("name"):
            facts["wrapup_name"] = str(wrapup["name"])
        if wrapup.get("notes"):
            facts["wrapup_notes"] = str(wrapup["notes"])
    facts.update(latest_agent(payload.get("participants")))
    return facts


def latest_agent(participants: Any) -> dict[str, str]:
    """The agent who joined last is the conversation's agent (after a transfer, the one it went to)."""
    agents = [p for p in participants or () if isinstance(p, dict) and p.get("purpose") == "agent"]
    if not agents:
        return {}
    agent = max(agents, key=lambda p: str(p.get("connectedTime") or ""))
    return {k: str(v) for k, v in (("agent_id", agent.get("userId")), ("agent_name", agent.get("name"))) if v}


def sse_participant(raw: dict[str, Any]) -> ParticipantFacts:
    return ParticipantFacts(
        participant_id=raw["participantId"],
        purpose=raw.get("purpose"),
        user_id=raw.get("userId"),
        name=raw.get("name"),
        queue_id=raw.get("queueId"),
        connected_at=optional_time(raw.get("connectedTime"), field="participants.connectedTime"),
        ended_at=optional_time(raw.get("endTime"), field="participants.endTime"),
    )
