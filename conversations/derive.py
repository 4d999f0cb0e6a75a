"""Derived conversation state as a pure fold over events.

Every rule here is commutative, associative and idempotent, so any order of the same events, with any
duplicates, gives the same state: the state only moves forward, times are minima or maxima of event times,
and each attribute holds the value stated by the newest event (by occurred-at, then dedupe key) that stated it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from conversations.events import STATE_OF_KIND, STATE_RANK, EventKind, ParticipantFacts, TypedEvent

CONVERSATION_ATTRS = (
    "media_type", "direction", "queue_id", "queue_name", "agent_id", "agent_name", "ani", "dnis", "wrapup_code", "wrapup_name", "wrapup_notes",
)
PARTICIPANT_ATTRS = tuple(f.name for f in fields(ParticipantFacts) if f.name != "participant_id")


def version_of(event: TypedEvent) -> str:
    """A string that sorts like (occurred_at, dedupe_key): fixed-width UTC time, then the key."""
    return f"{event.occurred_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%f}|{event.dedupe_key}"


@dataclass
class ConversationRecord:
    conversation_id: str
    state: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    wrapped_up_at: datetime | None = None
    last_event_at: datetime | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class ParticipantRecord:
    participant_id: str
    attrs: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def _earliest(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None or candidate < current else current


def _latest(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None or candidate > current else current


def merge_attrs(attrs: dict[str, Any], versions: dict[str, str], stated: dict[str, Any], version: str) -> None:
    """Newest statement wins per attribute; an event that does not state an attribute leaves it alone."""
    for name, value in stated.items():
        if value is None or value == "":
            continue
        if version > versions.get(name, ""):
            attrs[name] = value
            versions[name] = version


def apply_event(record: ConversationRecord, event: TypedEvent, *, version: str | None = None) -> None:
    """Fold one event into a conversation. Unknown events never move a conversation. `version` is the event's
    version_of(), for a caller that has it already."""
    state = STATE_OF_KIND.get(event.kind)
    if state is None:
        return
    if STATE_RANK.get(record.state, 0) < STATE_RANK[state]:
        record.state = state
    # A conversation started no later than any of its events; it ended and was wrapped up at the earliest
    # time any event says so.
    record.started_at = _earliest(record.started_at, event.started_at or event.occurred_at)
    record.last_event_at = _latest(record.last_event_at, event.occurred_at)
    ended_at = event.ended_at or (event.occurred_at if event.kind is EventKind.END else None)
    if ended_at is not None:
        record.ended_at = _earliest(record.ended_at, ended_at)
    wrapped_up_at = event.wrapped_up_at or (event.occurred_at if event.kind is EventKind.WRAPUP else None)
    if wrapped_up_at is not None:
        record.wrapped_up_at = _earliest(record.wrapped_up_at, wrapped_up_at)
    merge_attrs(record.attrs, record.versions, event.facts, version or version_of(event))


def apply_participant(record: ParticipantRecord, facts: ParticipantFacts, version: str) -> None:
    """merge_attrs over the facts' attributes, without building a dict of them (this runs for every participant
    of every event)."""
    attrs, versions = record.attrs, record.versions
    for name in PARTICIPANT_ATTRS:
        value = getattr(facts, name)
        if value is None or value == "":
            continue
        if version > versions.get(name, ""):
            attrs[name] = value
            versions[name] = version
