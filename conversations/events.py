"""The typed event: what every source's wire format is normalized into before it reaches the database."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class EventKind(enum.StrEnum):
    START = "start"
    UPDATE = "update"
    END = "end"
    WRAPUP = "wrapup"
    UNKNOWN = "unknown"


class ConversationState(enum.StrEnum):
    ACTIVE = "active"
    ENDED = "ended"
    WRAPPED_UP = "wrapped_up"


# State only moves forward along this order.
STATE_RANK: dict[str, int] = {ConversationState.ACTIVE: 1, ConversationState.ENDED: 2, ConversationState.WRAPPED_UP: 3}
STATE_OF_KIND: dict[EventKind, ConversationState] = {
    EventKind.START: ConversationState.ACTIVE,
    EventKind.UPDATE: ConversationState.ACTIVE,
    EventKind.END: ConversationState.ENDED,
    EventKind.WRAPUP: ConversationState.WRAPPED_UP,
}


@dataclass(frozen=True, slots=True)
class ParticipantFacts:
    """What one event says about one participant; None means "this event does not say"."""

    participant_id: str
    purpose: str | None = None
    user_id: str | None = None
    name: str | None = None
    queue_id: str | None = None
    connected_at: datetime | None = None
    ended_at: datetime | None = None
    wrapup_code: str | None = None
    wrapup_notes: str | None = None
    acw_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class TypedEvent:
    kind: EventKind
    conversation_id: str
    occurred_at: datetime
    source: str
    event_type: str
    dedupe_key: str
    payload: dict[str, Any]
    sse_id: str | None = None
    # Conversation attributes this event states (media_type, direction, queue_id, ani, dnis, wrapup_code, ...).
    facts: dict[str, Any] = field(default_factory=dict)
    participants: tuple[ParticipantFacts, ...] = ()
    # Lifecycle times the payload states explicitly (a Notifications snapshot carries them; an SSE event's own
    # timestamp is its time). None: the event's occurred_at stands for it, as its kind implies.
    started_at: datetime | None = None
    ended_at: datetime | None = None
    wrapped_up_at: datetime | None = None

    @property
    def version(self) -> tuple[datetime, str]:
        """Total order used to pick the newest value of a field, whatever order events arrive in."""
        return (self.occurred_at, self.dedupe_key)


@dataclass(frozen=True, slots=True)
class Reject:
    """Input that could not be turned into an event: kept with its raw text, never dropped."""

    source: str
    raw: str
    error: str
    sse_id: str | None = None
