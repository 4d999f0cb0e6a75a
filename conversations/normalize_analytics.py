"""Analytics conversation records (the details query, for backfill) -> typed events with source "backfill".

A record is a whole conversation as Genesys stored it (../shared/genesys/README.md, section 5): participants,
their sessions, and each session's segments (`interact`, `ivr`, `alert`, `dialing`, `hold`, `wrapup`, ...).
It has no lifecycle type: as for a Notifications snapshot, the lifecycle is derived, with explicit times:

* started_at    = conversationStart
* ended_at      = when the customers (external parties) left: the end of their last segment; without any,
                  conversationEnd. Agents leaving (transfer, reject) is not the end.
* wrapped_up_at = the end of the last completed `wrapup` segment (one with a wrapUpCode), once no agent's
                  after-call work is still open
* kind: wrapup | end | start (no agent connected yet) | update; the record's time is the latest it states.

Facts follow the live sources' rules, so a backfilled conversation ends in the state the stream would have
given it: media, direction, ANI and DNIS from the customer's session; the queue of the latest connected agent,
else of the latest ACD leg; that agent's id and name; the wrap-up code and note of the latest agent who has
one; names of queues and wrap-up codes through `Names` (the records carry ids only).

Each record is one event, its dedupe key the hash of the record: fetching the same record twice stores it
once, and a record fetched again later with more in it is a new event that folds into the same state.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from conversations.events import EventKind, ParticipantFacts, Reject, TypedEvent
from conversations.normalize import PayloadError, dedupe_key, optional_time, parse_time
from conversations.normalize_notifications import NO_NAMES, Names

SOURCE = "backfill"
EVENT_TYPE = "analytics.conversation"
EXTERNAL_PURPOSES = frozenset({"customer", "external"})
# Segments of a party that has not (yet) been connected to anyone: ringing, dialling, a scheduled callback.
UNCONNECTED_SEGMENTS = frozenset({"alert", "dialing", "contacting", "scheduled", "callback"})
WRAPUP_SEGMENT = "wrapup"

Item = TypedEvent | Reject


def normalize_conversation(record: Any, *, names: Names = NO_NAMES) -> Item:
    """One analytics record -> a typed event, or a reject that keeps its raw text."""
    try:
        if not isinstance(record, dict):
            raise PayloadError(f"expected a JSON object, got {type(record).__name__}")
        return analytics_event(record, names=names)
    except PayloadError as exc:
        return Reject(source=SOURCE, raw=orjson.dumps(record).decode(), error=f"{type(exc).__name__}: {exc}")


# --- reading a record ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    kind: str
    start: datetime | None
    end: datetime | None
    raw: dict[str, Any]

    @property
    def closed(self) -> bool:
        return self.end is not None


@dataclass(frozen=True, slots=True)
class Party:
    """One participant of a record, read once: its sessions' segments in time order."""

    raw: dict[str, Any]
    sessions: tuple[dict[str, Any], ...]
    segments: tuple[Segment, ...]

    @property
    def purpose(self) -> str:
        return str(self.raw.get("purpose") or "").lower()

    @property
    def external(self) -> bool:
        return self.purpose in EXTERNAL_PURPOSES

    @property
    def talking(self) -> tuple[Segment, ...]:
        """Everything but after-call work."""
        return tuple(s for s in self.segments if s.kind != WRAPUP_SEGMENT)

    @property
    def wrapups(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.kind == WRAPUP_SEGMENT)

    @property
    def connected_at(self) -> datetime | None:
        return next((s.start for s in self.talking if s.kind not in UNCONNECTED_SEGMENTS and s.start), None)

    @property
    def ended_at(self) -> datetime | None:
        """When this party left: every segment but after-call work closed, at the last one's end."""
        talking = self.talking
        if not talking or not all(s.closed for s in talking):
            return None
        return max(s.end for s in talking if s.end is not None)

    @property
    def queue_id(self) -> str | None:
        return next((str(s.raw["queueId"]) for s in reversed(self.segments) if s.raw.get("queueId")), None)

    def wrapup_done(self) -> Segment | None:
        """The agent's last completed wrap-up: closed and coded."""
        return next((s for s in reversed(self.wrapups) if s.closed and s.raw.get("wrapUpCode")), None)

    def wrapup_pending(self) -> bool:
        return any(not s.closed for s in self.wrapups)


def parties(record: dict[str, Any]) -> list[Party]:
    return [_party(p) for p in record.get("participants") or () if isinstance(p, dict)]


def _party(raw: dict[str, Any]) -> Party:
    sessions = tuple(s for s in raw.get("sessions") or () if isinstance(s, dict))
    segments = [_segment(raw_segment) for session in sessions for raw_segment in session.get("segments") or ()
                if isinstance(raw_segment, dict)]
    segments.sort(key=lambda s: (s.start is None, s.start or datetime.min))
    return Party(raw=raw, sessions=sessions, segments=tuple(segments))


def _segment(raw: dict[str, Any]) -> Segment:
    return Segment(
        kind=str(raw.get("segmentType") or "").lower(),
        start=optional_time(raw.get("segmentStart"), field="segments.segmentStart"),
        end=optional_time(raw.get("segmentEnd"), field="segments.segmentEnd"),
        raw=raw,
    )


# --- the event -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lifecycle:
    kind: EventKind
    started_at: datetime
    ended_at: datetime | None
    wrapped_up_at: datetime | None


def analytics_event(record: dict[str, Any], *, names: Names) -> TypedEvent:
    conversation_id = record.get("conversationId")
    if not isinstance(conversation_id, str) or not conversation_id:
        raise PayloadError("the analytics record has no conversationId")
    people = parties(record)
    lifecycle = record_lifecycle(record, people)
    return TypedEvent(
        kind=lifecycle.kind,
        conversation_id=conversation_id,
        occurred_at=record_time(record, people),
        source=SOURCE,
        event_type=EVENT_TYPE,
        dedupe_key=dedupe_key(SOURCE, record),
        payload=record,
        facts=record_facts(record, people, names=names),
        participants=tuple(party_facts(p) for p in people if isinstance(p.raw.get("participantId"), str)),
        started_at=lifecycle.started_at,
        ended_at=lifecycle.ended_at,
        wrapped_up_at=lifecycle.wrapped_up_at,
    )


def _times(record: dict[str, Any], people: list[Party]) -> Iterator[datetime]:
    for name in ("conversationStart", "conversationEnd"):
        if (moment := optional_time(record.get(name), field=name)) is not None:
            yield moment
    for party in people:
        for segment in party.segments:
            yield from (t for t in (segment.start, segment.end) if t is not None)


def record_time(record: dict[str, Any], people: list[Party]) -> datetime:
    """The latest time the record states: the moment it describes."""
    return max(_times(record, people))


def last_activity(record: dict[str, Any], people: list[Party]) -> datetime | None:
    """When the record's last segment ended; None while the conversation goes on (a segment is still open)."""
    segments = [s for p in people for s in p.segments]
    if any(not s.closed for s in segments) or (not segments and not record.get("conversationEnd")):
        return None
    return record_time(record, people)


def overlaps(record: Any, since: datetime, until: datetime) -> bool:
    """Did the conversation live in [since, until]: started before `until`, and not over before `since`?

    A record that cannot be read is kept: the normalizer stores it as a reject, with its raw text.
    """
    try:
        started = parse_time(record.get("conversationStart"), field="conversationStart")
        people = parties(record)
        last = last_activity(record, people)
    except (PayloadError, AttributeError):
        return True
    return started <= until and (last is None or last >= since)


def record_lifecycle(record: dict[str, Any], people: list[Party]) -> Lifecycle:
    started_at = parse_time(record.get("conversationStart"), field="conversationStart")
    ended_at = conversation_end(record, people)
    wrapped_up_at = conversation_wrapup(people) if ended_at is not None else None
    if wrapped_up_at is not None:
        kind = EventKind.WRAPUP
    elif ended_at is not None:
        kind = EventKind.END
    elif any(p.purpose == "agent" and p.connected_at for p in people):
        kind = EventKind.UPDATE
    else:
        kind = EventKind.START
    return Lifecycle(kind=kind, started_at=started_at, ended_at=ended_at, wrapped_up_at=wrapped_up_at)


def conversation_end(record: dict[str, Any], people: list[Party]) -> datetime | None:
    """When the customers left; a record without customers ends at conversationEnd."""
    external = [p for p in people if p.external and p.talking]
    if not external:
        return optional_time(record.get("conversationEnd"), field="conversationEnd")
    ends = [p.ended_at for p in external]
    if any(end is None for end in ends):
        return None
    return max(end for end in ends if end is not None)


def conversation_wrapup(people: list[Party]) -> datetime | None:
    """Wrapped up once an agent finished its wrap-up and none has after-call work open; at the last end."""
    agents = [p for p in people if p.purpose == "agent"]
    if any(agent.wrapup_pending() for agent in agents):
        return None
    done = [segment.end for agent in agents if (segment := agent.wrapup_done()) is not None]
    return max((end for end in done if end is not None), default=None)


# --- facts -------------------------------------------------------------------------------------------------


def _by_connected(people: list[Party]) -> list[Party]:
    """Oldest connection first; parties never connected (a rejected offer) before all others."""
    return sorted(people, key=lambda p: p.connected_at.isoformat() if p.connected_at else "")


def record_facts(record: dict[str, Any], people: list[Party], *, names: Names) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    facts.update(_call_facts(record, people))
    facts.update(_queue_facts(people, names=names))
    facts.update(_agent_facts(people))
    facts.update(_wrapup_facts(people, names=names))
    return {name: value for name, value in facts.items() if value}


def _customer_session(people: list[Party]) -> dict[str, Any] | None:
    sessions = [s for p in people if p.external for s in p.sessions]
    sessions += [s for p in people if not p.external for s in p.sessions]
    return sessions[0] if sessions else None


def _lower(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) and value and value.lower() != "unknown" else None


def _call_facts(record: dict[str, Any], people: list[Party]) -> dict[str, Any]:
    session = _customer_session(people) or {}
    return {
        "media_type": _lower(session.get("mediaType")),
        "direction": _lower(session.get("direction")) or _lower(record.get("originatingDirection")),
        "ani": session.get("ani") if isinstance(session.get("ani"), str) else None,
        "dnis": session.get("dnis") if isinstance(session.get("dnis"), str) else None,
    }


def _queue_facts(people: list[Party], *, names: Names) -> dict[str, Any]:
    """The queue of the latest connected agent, else of the latest ACD leg."""
    agents = [p for p in people if p.purpose == "agent" and p.queue_id]
    acds = [p for p in people if p.purpose == "acd" and p.queue_id]
    holders = _by_connected(agents) or _by_connected(acds)
    queue_id = holders[-1].queue_id if holders else None
    if queue_id is None:
        return {}
    acd_name = next((str(p.raw["participantName"]) for p in acds
                     if p.queue_id == queue_id and p.raw.get("participantName")), None)
    return {"queue_id": queue_id, "queue_name": names.queue_name(queue_id) or acd_name}


def _agent_facts(people: list[Party]) -> dict[str, Any]:
    agents = _by_connected([p for p in people if p.purpose == "agent"])
    if not agents:
        return {}
    agent = agents[-1].raw
    return {"agent_id": agent.get("userId"), "agent_name": agent.get("participantName")}


def _wrapup_facts(people: list[Party], *, names: Names) -> dict[str, Any]:
    """The wrap-up of the latest agent who has one."""
    for agent in reversed(_by_connected([p for p in people if p.purpose == "agent"])):
        segment = agent.wrapup_done()
        if segment is not None:
            code = str(segment.raw["wrapUpCode"])
            note = segment.raw.get("wrapUpNote")
            return {"wrapup_code": code, "wrapup_name": names.wrapup_name(code),
                    "wrapup_notes": note if isinstance(note, str) else None}
    return {}


def party_facts(party: Party) -> ParticipantFacts:
    raw = party.raw
    wrapup = party.wrapup_done()
    note = wrapup.raw.get("wrapUpNote") if wrapup else None
    return ParticipantFacts(
        participant_id=raw["participantId"],
        purpose=party.purpose or None,
        user_id=raw.get("userId") if isinstance(raw.get("userId"), str) else None,
        name=raw.get("participantName") if isinstance(raw.get("participantName"), str) else None,
        queue_id=party.queue_id,
        connected_at=party.connected_at,
        ended_at=party.ended_at,
        wrapup_code=str(wrapup.raw["wrapUpCode"]) if wrapup else None,
        wrapup_notes=note if isinstance(note, str) and note else None,
        acw_seconds=_acw_seconds(wrapup),
    )


def _acw_seconds(wrapup: Segment | None) -> int | None:
    if wrapup is None or wrapup.start is None or wrapup.end is None:
        return None
    return max(0, round((wrapup.end - wrapup.start).total_seconds()))
