"""Notifications API messages -> typed events. Knows the payload shapes, nothing about the database.

Two topic families carry conversations (../shared/genesys/README.md, section 4):

* conversation topics (`v2.routing.queues.{id}.conversations`, `v2.users.{id}.conversations`, and their per-media
  variants): a full snapshot on every change, with no start/end type. The lifecycle is derived from the
  participants, their communications, after-call work and wrap-up; the snapshot's own times are its event times.
* detail events (`v2.detail.events.conversation.{id}.{type}`): one fact each, epoch-ms `eventTime`, UPPERCASE
  enums. `customer.start` starts and `customer.end` ends a conversation; `user.end` does not (an agent who
  rejects, or a requeued chat, fires it while the customer is still there).

A message's identity is its body, not the topic it came on: the same snapshot delivered on a queue topic and a
user topic (or on two overlapping channels) has one dedupe key, so it is stored once. Heartbeats, pongs and
system messages are not events: the source handles them before normalizing.
"""
from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from conversations.events import EventKind, ParticipantFacts, Reject, TypedEvent
from conversations.normalize import PayloadError, dedupe_key, latest_agent, parse_time

SOURCE = "notifications"
SNAPSHOT_EVENT_TYPE = "conversation.snapshot"
CONVERSATION_TOPIC = re.compile(r"^v2\.(?:routing\.queues|users)\.[^.]+\.conversations(?:\.[A-Za-z]+)?$")
DETAIL_TOPIC = re.compile(r"^v2\.detail\.events\.conversation\.(?P<conversation>[^.]+)\.(?P<type>.+)$")
METADATA_TOPIC = "channel.metadata"
SYSTEM_TOPIC_PREFIX = "v2.system."

# A participant's communications, by the list they are in; the list names the conversation's media type.
MEDIA_OF_LIST: dict[str, str] = {
    "calls": "voice",
    "callbacks": "callback",
    "chats": "chat",
    "emails": "email",
    "messages": "message",
    "cobrowsesessions": "cobrowse",
    "screenshares": "screenshare",
    "videos": "video",
    "socialExpressions": "socialexpression",
}
# The parties whose leaving ends a conversation; agents leaving (transfer, reject) does not.
EXTERNAL_PURPOSES = frozenset({"customer", "external"})
ENDED_STATES = frozenset({"disconnected", "terminated"})
ACW_DONE_STATES = frozenset({"complete"})
ACW_NOT_NEEDED_STATES = frozenset({"skipped", "notApplicable"})
# Every time a snapshot can state; the latest of them is the snapshot's own time.
PARTICIPANT_TIMES = ("connectedTime", "endTime", "startAcwTime", "endAcwTime")
COMMUNICATION_TIMES = ("connectedTime", "disconnectedTime", "startHoldTime", "callbackScheduledTime")

DETAIL_KINDS: dict[str, EventKind] = {
    "customer.start": EventKind.START,
    "customer.end": EventKind.END,
    "acd.start": EventKind.UPDATE,
    "acd.end": EventKind.UPDATE,
    "user.start": EventKind.UPDATE,
    "user.end": EventKind.UPDATE,  # a reject or a requeue fires it too: never the conversation's end
    "acw": EventKind.UPDATE,  # one agent's after-call work; the snapshot says when the conversation is wrapped up
    "wrapup": EventKind.UPDATE,
    "flow.start": EventKind.UPDATE,
    "flow.end": EventKind.UPDATE,
}
DETAIL_PURPOSES: dict[str, str] = {
    "customer": "customer", "acd": "acd", "user": "agent", "acw": "agent", "wrapup": "agent",
}
DETAIL_FACTS: dict[str, str] = {"ani": "ani", "dnis": "dnis", "queueId": "queue_id"}

Item = TypedEvent | Reject


class Names(Protocol):
    """Names the payloads do not carry: a queue's name (from the queue listing) and a wrap-up code's name."""

    def queue_name(self, queue_id: str) -> str | None: ...

    def wrapup_name(self, code_id: str) -> str | None: ...


@dataclass
class StaticNames:
    """Names from plain dicts (tests, or a source that loaded them up front)."""

    queues: dict[str, str] = field(default_factory=dict)
    wrapup_codes: dict[str, str] = field(default_factory=dict)

    def queue_name(self, queue_id: str) -> str | None:
        return self.queues.get(queue_id)

    def wrapup_name(self, code_id: str) -> str | None:
        return self.wrapup_codes.get(code_id)


NO_NAMES = StaticNames()


def is_control(topic: str) -> bool:
    """Heartbeats, pongs and system messages: the source's business, never events."""
    return topic == METADATA_TOPIC or topic.startswith(SYSTEM_TOPIC_PREFIX)


def parse_message(raw: str | bytes) -> dict[str, Any] | None:
    """The message as a dict with a string topicName, or None when it is not one."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("topicName"), str):
        return None
    return message


def normalize_notification(raw: str, *, names: Names = NO_NAMES) -> list[Item]:
    """One WebSocket text message -> its events (none for control messages), or a reject with the raw text."""
    message = parse_message(raw)
    if message is None:
        return [_reject(raw, "not a JSON object with a topicName")]
    return normalize_message(message, raw=raw, names=names)


def normalize_message(message: dict[str, Any], *, raw: str, names: Names = NO_NAMES) -> list[Item]:
    topic = message["topicName"]
    if is_control(topic):
        return []
    try:
        return [event_of(message, topic=topic, names=names)]
    except PayloadError as exc:
        return [_reject(raw, f"{type(exc).__name__}: {exc}")]


def event_of(message: dict[str, Any], *, topic: str, names: Names) -> TypedEvent:
    body = message.get("eventBody")
    if not isinstance(body, dict):
        raise PayloadError(f"eventBody of {topic} is missing or not an object")
    if CONVERSATION_TOPIC.match(topic):
        return snapshot_event(message, body, names=names)
    detail = DETAIL_TOPIC.match(topic)
    if detail is not None:
        return detail_event(message, body, detail_type=detail["type"], topic_conversation=detail["conversation"],
                            names=names)
    return unknown_event(message, body, topic=topic)


def _reject(raw: str, error: str) -> Reject:
    return Reject(source=SOURCE, raw=raw, error=error)


# --- conversation snapshots -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """What a snapshot says about where its conversation is."""

    kind: EventKind
    started_at: datetime | None
    ended_at: datetime | None
    wrapped_up_at: datetime | None


def snapshot_event(message: dict[str, Any], body: dict[str, Any], *, names: Names) -> TypedEvent:
    _snapshot_memo.communications = {}
    try:
        return _snapshot_event(message, body, names=names)
    finally:
        _snapshot_memo.communications = None


def _snapshot_event(message: dict[str, Any], body: dict[str, Any], *, names: Names) -> TypedEvent:
    conversation_id = body.get("id")
    if not isinstance(conversation_id, str) or not conversation_id:
        raise PayloadError("the conversation snapshot has no id")
    participants = [p for p in body.get("participants") or () if isinstance(p, dict)]
    lifecycle = snapshot_lifecycle(participants)
    return TypedEvent(
        kind=lifecycle.kind,
        conversation_id=conversation_id,
        occurred_at=snapshot_time(participants) or datetime.now(UTC),
        source=SOURCE,
        event_type=SNAPSHOT_EVENT_TYPE,
        dedupe_key=dedupe_key(SOURCE, {"snapshot": body}),
        payload=message,
        facts=snapshot_facts(participants, names=names),
        participants=tuple(snapshot_participant(p) for p in participants if isinstance(p.get("id"), str)),
        started_at=lifecycle.started_at,
        ended_at=lifecycle.ended_at,
        wrapped_up_at=lifecycle.wrapped_up_at,
    )


def communications(participant: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(media type, communication) for every communication of a participant, in a stable order. While a
    snapshot is normalized, each participant's list is made once (several rules look at it)."""
    memo: dict[int, list[tuple[str, dict[str, Any]]]] | None = getattr(_snapshot_memo, "communications", None)
    if memo is not None and (found := memo.get(id(participant))) is not None:
        return found
    found = [
        (media, communication)
        for list_name, media in MEDIA_OF_LIST.items() if (listed := participant.get(list_name))
        for communication in listed if isinstance(communication, dict)
    ]
    if memo is not None:
        memo[id(participant)] = found
    return found


# Per thread, for the duration of one snapshot_event() (whose participants stay alive, so ids are not reused).
_snapshot_memo = threading.local()


@functools.lru_cache(maxsize=16_384)
def _iso_time(value: str) -> datetime | None:
    """A snapshot restates every earlier time of its conversation, so most times were parsed moments ago."""
    try:
        return parse_time(value, field="")
    except PayloadError:
        return None


def _time(value: Any, *, field: str) -> datetime | None:
    if value is None or value == "":
        return None
    if type(value) is str and (moment := _iso_time(value)) is not None:
        return moment
    return parse_time(value, field=field)  # not a time: raises, naming the field


def _times(holder: dict[str, Any], names: Iterable[str], *, where: str) -> list[datetime]:
    found = []
    for name in names:
        value = holder.get(name)
        if value is None or value == "":
            continue
        moment = _iso_time(value) if type(value) is str else None
        found.append(moment if moment is not None else parse_time(value, field=f"{where}.{name}"))
    return found


def snapshot_time(participants: list[dict[str, Any]]) -> datetime | None:
    """The latest time the snapshot states: the moment of the change it reports."""
    times: list[datetime] = []
    for participant in participants:
        times += _times(participant, PARTICIPANT_TIMES, where="participants")
        times += _wrapup_times(participant)
        for _, communication in communications(participant):
            times += _times(communication, COMMUNICATION_TIMES, where="communication")
            times += _acw_times(communication)
    return max(times, default=None)


def _wrapup_times(holder: dict[str, Any]) -> list[datetime]:
    wrapup = holder.get("wrapup")
    if not isinstance(wrapup, dict):
        return []
    return _times(wrapup, ("endTime",), where="wrapup")


def _acw_times(communication: dict[str, Any]) -> list[datetime]:
    acw = communication.get("afterCallWork")
    times = _wrapup_times(communication)
    if isinstance(acw, dict):
        times += _times(acw, ("startTime", "endTime"), where="afterCallWork")
    return times


def snapshot_lifecycle(participants: list[dict[str, Any]]) -> Lifecycle:
    """start (nobody answered yet) -> update -> end (the customer left) -> wrapup (no agent's wrap-up pending)."""
    started_at = min(_connected_times(participants), default=None)
    ended, ended_at = conversation_end(participants)
    wrapped, wrapped_up_at = conversation_wrapup(participants) if ended else (False, None)
    if wrapped:
        kind = EventKind.WRAPUP
    elif ended:
        kind = EventKind.END
    elif _still_starting(participants):
        kind = EventKind.START
    else:
        kind = EventKind.UPDATE
    return Lifecycle(kind=kind, started_at=started_at, ended_at=ended_at if ended else None,
                     wrapped_up_at=wrapped_up_at if wrapped else None)


def _connected_times(participants: list[dict[str, Any]]) -> list[datetime]:
    times = []
    for participant in participants:
        times += _times(participant, ("connectedTime",), where="participants")
        for _, communication in communications(participant):
            times += _times(communication, ("connectedTime",), where="communication")
    return times


def participant_end(participant: dict[str, Any]) -> tuple[bool, datetime | None]:
    """Has this participant left, and when: its endTime, or all its communications disconnected."""
    end_time = _time(participant.get("endTime"), field="participants.endTime")
    if end_time is not None:
        return True, end_time
    comms = [communication for _, communication in communications(participant)]
    if not comms or not all(c.get("state") in ENDED_STATES for c in comms):
        return False, None
    disconnected = [t for c in comms if (t := _time(c.get("disconnectedTime"), field="disconnectedTime"))]
    return True, max(disconnected, default=None)


def conversation_end(participants: list[dict[str, Any]]) -> tuple[bool, datetime | None]:
    """A conversation ends when its customers (or, without any, all its participants) have left."""
    external = [p for p in participants if p.get("purpose") in EXTERNAL_PURPOSES] or participants
    if not external:
        return False, None
    ends = [participant_end(p) for p in external]
    if not all(done for done, _ in ends):
        return False, None
    return True, max((t for _, t in ends if t is not None), default=None)


def agent_wrapup(agent: dict[str, Any]) -> tuple[str, datetime | None]:
    """("done", when) | ("pending", None) | ("none", None): where this agent's wrap-up stands."""
    wrapup = _wrapup_of(agent)
    acw_states = {c["afterCallWork"].get("state") for _, c in communications(agent)
                  if isinstance(c.get("afterCallWork"), dict)}
    end_acw = _time(agent.get("endAcwTime"), field="participants.endAcwTime")
    if (wrapup and wrapup.get("code")) or end_acw is not None or acw_states & ACW_DONE_STATES:
        return "done", _wrapup_done_at(agent, wrapup, end_acw)
    if "pending" in acw_states or (agent.get("wrapupRequired") is True and not acw_states & ACW_NOT_NEEDED_STATES):
        return "pending", None
    return "none", None


def _wrapup_of(holder: dict[str, Any]) -> dict[str, Any] | None:
    """A participant's wrap-up, or that of one of its communications (the SDK allows both places)."""
    wrapup = holder.get("wrapup")
    if isinstance(wrapup, dict):
        return wrapup
    for _, communication in communications(holder):
        if isinstance(communication.get("wrapup"), dict):
            return communication["wrapup"]
    return None


def _wrapup_done_at(agent: dict[str, Any], wrapup: dict[str, Any] | None, end_acw: datetime | None) -> datetime | None:
    if wrapup is not None and (end := _time(wrapup.get("endTime"), field="wrapup.endTime")) is not None:
        return end
    if end_acw is not None:
        return end_acw
    acw_ends = [t for _, c in communications(agent) for t in _acw_times(c)]
    return max(acw_ends, default=None)


def conversation_wrapup(participants: list[dict[str, Any]]) -> tuple[bool, datetime | None]:
    """Wrapped up once some agent finished its wrap-up and none has one pending; at the last one's end."""
    states = [agent_wrapup(p) for p in participants if p.get("purpose") == "agent"]
    done = [at for state, at in states if state == "done"]
    if not done or any(state == "pending" for state, _ in states):
        return False, None
    return True, max((t for t in done if t is not None), default=None)


def _still_starting(participants: list[dict[str, Any]]) -> bool:
    """Nothing has ended yet and the customer is not yet talking to an agent."""
    if any(participant_end(p)[0] for p in participants):
        return False
    agents = [p for p in participants if p.get("purpose") == "agent"]
    customers = [p for p in participants if p.get("purpose") in EXTERNAL_PURPOSES]
    agent_connected = any(_is_connected(p) for p in agents)
    customer_connected = all(_is_connected(p) for p in customers) if customers else True
    return not (agent_connected and customer_connected)


def _is_connected(participant: dict[str, Any]) -> bool:
    if participant.get("connectedTime"):
        return True
    return any(c.get("state") == "connected" for _, c in communications(participant))


# --- snapshot facts --------------------------------------------------------------------------------------


def snapshot_facts(participants: list[dict[str, Any]], *, names: Names) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    customer = _customer_communication(participants)
    if customer is not None:
        media, communication, party = customer
        facts["media_type"] = media
        facts.update(_direction_and_numbers(media, communication, party, participants))
    elif (media := _any_media(participants)) is not None:
        facts["media_type"] = media
    facts.update(_queue_facts(participants, names=names))
    facts.update(latest_agent(participants))
    facts.update(_wrapup_facts(participants, names=names))
    return {name: value for name, value in facts.items() if value}


def _customer_communication(participants: list[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    for participant in participants:
        if participant.get("purpose") in EXTERNAL_PURPOSES:
            for media, communication in communications(participant):
                return media, communication, participant
    return None


def _any_media(participants: list[dict[str, Any]]) -> str | None:
    return next((media for p in participants for media, _ in communications(p)), None)


def _address(value: Any) -> str | None:
    """An address object (`self`/`other` of a call) or a plain string."""
    if isinstance(value, dict):
        for key in ("addressNormalized", "addressRaw", "addressDisplayable"):
            if isinstance(value.get(key), str) and value[key]:
                return value[key]
        return None
    return value if isinstance(value, str) and value else None


def _direction_and_numbers(
    media: str, communication: dict[str, Any], customer: dict[str, Any], participants: list[dict[str, Any]]
) -> dict[str, Any]:
    """ANI is who called, DNIS who was called: the customer's own address on inbound, the org's on outbound."""
    direction = communication.get("direction")
    if not isinstance(direction, str) or not direction:
        # The SDK's chat model has no direction: a web chat is always started by the customer.
        direction = "inbound" if media == "chat" else None
    own = _address(communication.get("self")) or _address(customer.get("address"))
    other = _address(communication.get("other")) or _address(communication.get("callerId")) or _org_address(participants)
    if own is None:
        return {"direction": direction}
    ani, dnis = (other, own) if direction == "outbound" else (own, other)
    return {"direction": direction, "ani": ani, "dnis": dnis}


def _org_address(participants: list[dict[str, Any]]) -> str | None:
    """The org's number, as the address of an ACD, IVR or agent participant."""
    return next((a for p in participants if p.get("purpose") not in EXTERNAL_PURPOSES
                 if (a := _address(p.get("address"))) is not None), None)


def _by_connected(participants: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(participants, key=lambda p: str(p.get("connectedTime") or ""))


def _queue_facts(participants: list[dict[str, Any]], *, names: Names) -> dict[str, Any]:
    """The conversation's queue is that of its latest agent, else of the latest ACD leg."""
    agents = [p for p in participants if p.get("purpose") == "agent" and p.get("queueId")]
    acds = [p for p in participants if p.get("purpose") == "acd" and p.get("queueId")]
    holder = (_by_connected(agents) or _by_connected(acds) or [None])[-1]
    if holder is None:
        return {}
    queue_id = str(holder["queueId"])
    acd_name = next((str(p["name"]) for p in acds if p.get("queueId") == queue_id and p.get("name")), None)
    return {"queue_id": queue_id, "queue_name": names.queue_name(queue_id) or acd_name}


def _wrapup_facts(participants: list[dict[str, Any]], *, names: Names) -> dict[str, Any]:
    """The wrap-up of the latest agent who has one."""
    agents = [p for p in _by_connected(participants) if p.get("purpose") == "agent"]
    for agent in reversed(agents):
        wrapup = _wrapup_of(agent)
        if wrapup and wrapup.get("code"):
            code = str(wrapup["code"])
            return {"wrapup_code": code, "wrapup_name": names.wrapup_name(code),
                    "wrapup_notes": wrapup.get("notes") if isinstance(wrapup.get("notes"), str) else None}
    return {}


def snapshot_participant(raw: dict[str, Any]) -> ParticipantFacts:
    wrapup = _wrapup_of(raw) or {}
    return ParticipantFacts(
        participant_id=raw["id"],
        purpose=raw.get("purpose"),
        user_id=raw.get("userId"),
        name=raw.get("name"),
        queue_id=raw.get("queueId"),
        connected_at=_time(raw.get("connectedTime"), field="participants.connectedTime"),
        ended_at=participant_end(raw)[1],
        wrapup_code=str(wrapup["code"]) if wrapup.get("code") else None,
        wrapup_notes=wrapup.get("notes") if isinstance(wrapup.get("notes"), str) else None,
        acw_seconds=_acw_seconds(raw, wrapup),
    )


def _acw_seconds(raw: dict[str, Any], wrapup: dict[str, Any]) -> int | None:
    if isinstance(wrapup.get("durationSeconds"), (int, float)):
        return int(wrapup["durationSeconds"])
    start = _time(raw.get("startAcwTime"), field="participants.startAcwTime")
    end = _time(raw.get("endAcwTime"), field="participants.endAcwTime")
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds()))


# --- detail events ---------------------------------------------------------------------------------------


def epoch_millis(value: Any, *, field: str) -> datetime:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError(f"{field} is missing or not epoch milliseconds")
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise PayloadError(f"{field}={value!r} is out of range") from None


def detail_event(
    message: dict[str, Any], body: dict[str, Any], *, detail_type: str, topic_conversation: str, names: Names
) -> TypedEvent:
    conversation_id = body.get("conversationId") or topic_conversation
    if not isinstance(conversation_id, str) or not conversation_id:
        raise PayloadError("the detail event has no conversationId")
    return TypedEvent(
        kind=DETAIL_KINDS.get(detail_type, EventKind.UNKNOWN),
        conversation_id=conversation_id,
        occurred_at=epoch_millis(body.get("eventTime"), field="eventTime"),
        source=SOURCE,
        event_type=f"detail.{detail_type}",
        dedupe_key=dedupe_key(SOURCE, {"detail": detail_type, "body": body}),
        payload=message,
        facts=detail_facts(body, detail_type=detail_type, names=names),
        participants=detail_participants(body, detail_type=detail_type),
    )


def _lower(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) and value and value != "UNKNOWN" else None


def detail_facts(body: dict[str, Any], *, detail_type: str, names: Names) -> dict[str, Any]:
    facts: dict[str, Any] = {"media_type": _lower(body.get("mediaType")), "direction": _lower(body.get("direction"))}
    facts.update({attr: body[key] for key, attr in DETAIL_FACTS.items() if isinstance(body.get(key), str)})
    if facts.get("queue_id"):
        facts["queue_name"] = names.queue_name(facts["queue_id"])
    if detail_type == "user.start" and isinstance(body.get("userId"), str):
        facts["agent_id"] = body["userId"]
    if isinstance(body.get("wrapupCode"), str) and body["wrapupCode"]:
        facts["wrapup_code"] = body["wrapupCode"]
        facts["wrapup_name"] = names.wrapup_name(body["wrapupCode"])
        facts["wrapup_notes"] = body.get("wrapupNotes") if isinstance(body.get("wrapupNotes"), str) else None
    return {name: value for name, value in facts.items() if value}


def detail_participants(body: dict[str, Any], *, detail_type: str) -> tuple[ParticipantFacts, ...]:
    participant_id = body.get("participantId")
    if not isinstance(participant_id, str) or not participant_id:
        return ()
    family, _, phase = detail_type.partition(".")
    occurred_at = epoch_millis(body.get("eventTime"), field="eventTime")
    wrapup_ms = body.get("wrapupDurationMs")
    return (
        ParticipantFacts(
            participant_id=participant_id,
            purpose=DETAIL_PURPOSES.get(family),
            user_id=body.get("userId") if isinstance(body.get("userId"), str) else None,
            queue_id=body.get("queueId") if isinstance(body.get("queueId"), str) else None,
            ended_at=occurred_at if phase == "end" else None,
            wrapup_code=body.get("wrapupCode") or None,
            wrapup_notes=body.get("wrapupNotes") or None,
            acw_seconds=round(wrapup_ms / 1000) if isinstance(wrapup_ms, (int, float)) else None,
        ),
    )


# --- anything else -----------------------------------------------------------------------------------------


def unknown_event(message: dict[str, Any], body: dict[str, Any], *, topic: str) -> TypedEvent:
    """A topic we do not know: kept as an unknown event, never dropped, never moving a conversation."""
    conversation_id = body.get("conversationId") or body.get("id")
    return TypedEvent(
        kind=EventKind.UNKNOWN,
        conversation_id=conversation_id if isinstance(conversation_id, str) else "",
        occurred_at=datetime.now(UTC),
        source=SOURCE,
        event_type=topic[:200],
        dedupe_key=dedupe_key(SOURCE, message),
        payload=message,
    )
