"""The simulator's Notifications API: channels, subscriptions and one WebSocket per channel, like Genesys's.

The contract is /work/shared/genesys/README.md section 4; payload shapes follow the platform SDK's models
(QueueConversationEventTopicConversation and friends, the `*DetailEventTopic*Event` bodies and
SystemMessageSystemMessage).

Three parts:
- rendering: an SSE lifecycle payload -> the conversation snapshot and the detail events Genesys would
  publish for the same moment (`conversation_snapshot`, `detail_events`). Both are read off the one payload,
  so the two sources can only agree: the same times, queue, media, direction, numbers, agent and wrap-up.
- `NotificationsHub`: the state (channels, topics, sockets, a clock the tests move, knobs, stats, and a record
  of the REST requests with the time each arrived, so tests can see how a client spaces its retries).
  Thread-safe: the Simulator publishes from whatever thread appends, tests turn knobs from theirs, sockets
  live on the server's loop.
- `NotificationsRoutes`: the REST endpoints and the WebSocket, mounted on the SimulatorServer's aiohttp app.

Every message for a socket goes through that socket's outbox, in order, so a socket that is replaced (a second
connect on its channel) is sent everything published before the switch, then closed: a handover loses nothing.
"""
from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from aiohttp import WSMsgType, web

from conversations.genesys.scenario import AGENTS, EVENT_TYPES, QUEUES, iso

logger = logging.getLogger(__name__)

CHANNEL_TTL_SECONDS = 24 * 3600.0
MAX_CHANNELS = 20
MAX_TOPICS = 1000
MAX_PAGE_SIZE = 500
METADATA_TOPIC = "channel.metadata"
SOCKET_CLOSING_TOPIC = "v2.system.socket_closing"
HEARTBEAT_TEXT = '{"topicName":"channel.metadata","eventBody":{"message":"WebSocket Heartbeat"}}'
PONG_TEXT = '{"topicName":"channel.metadata","eventBody":{"message":"pong"}}'
_TICK = 0.05  # how often a socket's timer looks at its heartbeat and idle deadlines
# The REST endpoints by name: what `fail_next` can fail and what `requests()` records.
ENDPOINTS = ("create_channel", "list_channels", "head_channel", "subscriptions", "queues", "users")
REQUESTS_KEPT = 10_000  # the request record keeps the newest ones only: a long demo must not grow it forever

# SSE mediaType -> the participant's list of communications and the provider Genesys names.
COMMUNICATIONS = {"voice": "calls", "chat": "chats", "callback": "callbacks"}
PROVIDERS = {"voice": "Edge", "chat": "PureCloud Webchat v2", "callback": "PureCloud Callback"}
# Detail event kind -> what a refused subscription lacks (ChannelTopic.missingPermissions).
_PERMISSIONS = (
    ("v2.detail.events.*", "analytics:conversationDetail:view"),
    ("v2.routing.queues.*", "routing:queue:view"),
    ("v2.users.*", "conversation:communication:view"),
)
_DETAIL_ORDER = (
    "customer.start", "acd.start", "user.start", "acd.end", "user.end", "customer.end", "acw", "wrapup",
)


# --- rendering: one SSE lifecycle payload -> snapshot and detail events -----------------------------------


def queue_topic(queue_id: str) -> str:
    return f"v2.routing.queues.{queue_id}.conversations"


def user_topic(user_id: str) -> str:
    return f"v2.users.{user_id}.conversations"


def detail_topic(conversation_id: str, kind: str) -> str:
    return f"v2.detail.events.conversation.{conversation_id}.{kind}"


def session_id(participant_id: str) -> str:
    """A participant's one communication id, the same in every snapshot and detail event."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"session:{participant_id}"))


def is_lifecycle(payload: Any) -> bool:
    return (
        isinstance(payload, dict)
        and payload.get("eventType") in EVENT_TYPES
        and isinstance(payload.get("conversationId"), str)
    )


@dataclass(frozen=True, slots=True)
class DetailEvent:
    kind: str  # "customer.start", "user.end", "acw", ...
    participant_id: str
    body: dict[str, Any]

    @property
    def topic(self) -> str:
        return detail_topic(self.body["conversationId"], self.kind)


class _Moment:
    """What one SSE lifecycle payload says, in the terms both renderings need.

    Raises KeyError, TypeError or ValueError when the payload is not a lifecycle event it can read.
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        self.conversation_id: str = payload["conversationId"]
        self.at: str = payload["timestamp"]
        self.media: str = payload["mediaType"]
        if self.media not in COMMUNICATIONS:
            raise ValueError(f"unknown mediaType {self.media!r}")
        self.direction: str = payload["direction"]
        self.ani: str | None = payload.get("ani")
        self.dnis: str | None = payload.get("dnis")
        self.participants = [
            p for p in payload["participants"] if isinstance(p, dict) and p.get("participantId")
        ]
        self.wrapup: dict[str, Any] | None = (
            payload.get("wrapup") if payload["eventType"] == "conversation:wrapup" else None
        )
        connected = [str(p["connectedTime"]) for p in self.participants if p.get("connectedTime")]
        self.started_at = min(connected, default=self.at)
        customer = next((p for p in self.participants if p.get("purpose") == "customer"), {})
        self.ended_at: str | None = customer.get("endTime")
        agents = [p for p in self.participants if p.get("purpose") == "agent" and p.get("connectedTime")]
        self.last_agent = max(agents, key=lambda p: str(p["connectedTime"]), default=None)

    @property
    def inbound(self) -> bool:
        return self.direction == "inbound"

    @property
    def customer_number(self) -> str | None:
        return self.ani if self.inbound else self.dnis

    @property
    def org_number(self) -> str | None:
        return self.dnis if self.inbound else self.ani

    def wraps_up(self, participant: dict[str, Any]) -> bool:
        """Only the answering agent who stayed to the end does after-call work (transferred agents do not)."""
        return participant is self.last_agent

    def disconnect_type(self, participant: dict[str, Any]) -> str:
        purpose = participant.get("purpose")
        if purpose == "customer":
            return "endpoint"  # the customer hangs up
        if purpose == "agent" and not participant.get("connectedTime"):
            return "endpoint"  # offered and rejected
        if purpose == "agent" and participant.get("endTime") == self.ended_at:
            return "peer"  # the customer's hang-up ended the agent's leg
        return "transfer"  # ivr -> acd -> agent -> another agent


def conversation_snapshot(payload: dict[str, Any]) -> dict[str, Any]:
    """The QueueConversationEventTopicConversation body Genesys publishes at this payload's moment."""
    moment = _Moment(payload)
    return {
        "id": moment.conversation_id,
        "maxParticipants": len(moment.participants),
        "recordingState": "none",
        "participants": [_snapshot_participant(moment, p) for p in moment.participants],
    }


def _snapshot_participant(moment: _Moment, raw: dict[str, Any]) -> dict[str, Any]:
    purpose = raw.get("purpose")
    out: dict[str, Any] = {"id": raw["participantId"]}
    for key in ("connectedTime", "endTime", "userId", "name", "queueId", "purpose"):
        if raw.get(key):
            out[key] = raw[key]
    address = moment.customer_number if purpose == "customer" else moment.org_number
    if address:
        out["address"] = address
    if purpose == "agent":
        out.update(_agent_wrapup(moment, raw))
    out[COMMUNICATIONS[moment.media]] = [_communication(moment, raw)]
    return out


def _agent_wrapup(moment: _Moment, raw: dict[str, Any]) -> dict[str, Any]:
    if not moment.wraps_up(raw):
        return {"wrapupRequired": False}
    out: dict[str, Any] = {"wrapupRequired": True}
    if raw.get("endTime"):
        out["startAcwTime"] = raw["endTime"]
    if moment.wrapup is not None:
        out["endAcwTime"] = moment.at
        out["wrapup"] = {
            "code": moment.wrapup.get("code"),
            "notes": moment.wrapup.get("notes", ""),
            "durationSeconds": moment.wrapup.get("durationSeconds"),
            "endTime": moment.at,
        }
    return out


def _communication(moment: _Moment, raw: dict[str, Any]) -> dict[str, Any]:
    purpose = raw.get("purpose")
    ringing_first = purpose == "agent" or (purpose == "customer" and not moment.inbound)
    comm: dict[str, Any] = {
        "id": session_id(raw["participantId"]),
        "state": _state(moment, raw),
        "initialState": "alerting" if ringing_first else "connected",
        "held": False,
    }
    if moment.media != "chat":  # the SDK's chat model has no direction: a web chat is inbound
        comm["direction"] = moment.direction
    if raw.get("endTime"):
        comm["disconnectType"] = moment.disconnect_type(raw)
    for source, target in (("connectedTime", "connectedTime"), ("endTime", "disconnectedTime")):
        if raw.get(source):
            comm[target] = raw[source]
    comm["provider"] = PROVIDERS[moment.media]
    comm.update(_media_fields(moment, raw))
    if purpose == "agent":
        comm.update(_after_call_work(moment, raw))
    return comm


def _state(moment: _Moment, raw: dict[str, Any]) -> str:
    if moment.wrapup is not None:
        return "terminated"
    if raw.get("endTime"):
        return "disconnected"
    return "connected" if raw.get("connectedTime") else "alerting"


def _media_fields(moment: _Moment, raw: dict[str, Any]) -> dict[str, Any]:
    own, far = moment.customer_number, moment.org_number
    if raw.get("purpose") != "customer":
        own, far = far, own
    if moment.media == "voice":
        return {
            "self": {"addressNormalized": own}, "other": {"addressNormalized": far},
            "recording": False, "recordingState": "none", "muted": False, "confined": False,
        }
    if moment.media == "callback":
        customer = next((p for p in moment.participants if p.get("purpose") == "customer"), {})
        return {
            "callbackNumbers": [moment.customer_number] if moment.customer_number else [],
            "callbackUserName": customer.get("name", ""),
            "callerId": moment.org_number,
        }
    return {}


def _after_call_work(moment: _Moment, raw: dict[str, Any]) -> dict[str, Any]:
    if not moment.wraps_up(raw):
        return {"afterCallWorkRequired": False}
    out: dict[str, Any] = {"afterCallWorkRequired": True}
    if raw.get("endTime"):
        acw = {"state": "pending", "startTime": raw["endTime"]}
        if moment.wrapup is not None:
            acw.update(state="complete", endTime=moment.at)
        out["afterCallWork"] = acw
    return out


def snapshot_topics(snapshot: dict[str, Any]) -> list[str]:
    """Queue topics of every queue a participant is (or was) in, user topics of every agent: once each."""
    return _topics(snapshot["participants"])


def _topics(participants: list[dict[str, Any]]) -> list[str]:
    topics: dict[str, None] = {}
    for participant in participants:
        if participant.get("purpose") in ("acd", "agent") and participant.get("queueId"):
            topics[queue_topic(participant["queueId"])] = None
    for participant in participants:
        if participant.get("purpose") == "agent" and participant.get("userId"):
            topics[user_topic(participant["userId"])] = None
    return list(topics)


@dataclass(frozen=True, slots=True)
class _Planned:
    """A detail event this moment implies, not rendered yet (most are never sent: nobody subscribed)."""

    kind: str
    raw: dict[str, Any]
    at: str  # ISO time; these sort like the epoch milliseconds they become
    facts: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        return self.raw["participantId"], self.kind


def detail_events(payload: dict[str, Any]) -> list[DetailEvent]:
    """Every detail event this payload implies so far, by eventTime (the hub sends each one once)."""
    moment = _Moment(payload)
    return [_render_detail(moment, planned) for planned in _planned_details(moment)]


def _planned_details(moment: _Moment) -> list[_Planned]:
    planned = [event for raw in moment.participants for event in _participant_details(moment, raw)]
    return sorted(planned, key=lambda e: (e.at, _DETAIL_ORDER.index(e.kind)))


def _participant_details(moment: _Moment, raw: dict[str, Any]) -> Iterator[_Planned]:
    purpose, connected, ended = raw.get("purpose"), raw.get("connectedTime"), raw.get("endTime")
    if purpose == "customer":
        yield _Planned("customer.start", raw, moment.started_at, {})
        if ended:
            yield _Planned("customer.end", raw, ended, {"disconnectType": "ENDPOINT"})
    elif purpose in ("acd", "agent"):
        prefix = "acd" if purpose == "acd" else "user"
        if connected:
            yield _Planned(f"{prefix}.start", raw, connected, {})
        if ended:
            facts = {"disconnectType": moment.disconnect_type(raw).upper()}
            if purpose == "acd":
                facts["acdOutcome"] = "ANSWERED"
            yield _Planned(f"{prefix}.end", raw, ended, facts)
        if moment.wrapup is not None and moment.wraps_up(raw):
            facts = _wrapup_facts(moment, raw)
            yield _Planned("acw", raw, moment.at, facts)
            yield _Planned("wrapup", raw, moment.at, facts)


def _wrapup_facts(moment: _Moment, raw: dict[str, Any]) -> dict[str, Any]:
    assert moment.wrapup is not None
    facts: dict[str, Any] = {"wrapupCode": moment.wrapup.get("code")}
    if moment.wrapup.get("notes"):
        facts["wrapupNotes"] = moment.wrapup["notes"]
    if raw.get("endTime"):
        facts["wrapupDurationMs"] = epoch_ms(moment.at) - epoch_ms(raw["endTime"])
    return facts


def _render_detail(moment: _Moment, planned: _Planned) -> DetailEvent:
    raw, kind = planned.raw, planned.kind
    body: dict[str, Any] = {
        "eventTime": epoch_ms(planned.at),
        "conversationId": moment.conversation_id,
        "participantId": raw["participantId"],
        "sessionId": session_id(raw["participantId"]),
        "mediaType": moment.media.upper(),
        "provider": PROVIDERS[moment.media],
        "direction": moment.direction.upper(),
    }
    if moment.ani is not None:
        body["ani"] = moment.ani
    if moment.dnis is not None:
        body["dnis"] = moment.dnis
    if not kind.startswith("customer.") and raw.get("queueId"):
        body["queueId"] = raw["queueId"]
    if (kind.startswith("user.") or kind == "acw") and raw.get("userId"):
        body["userId"] = raw["userId"]
    body.update(planned.facts)
    return DetailEvent(kind=kind, participant_id=raw["participantId"], body=body)


def _detail_body(moment: _Moment, planned: _Planned) -> Callable[[], dict[str, Any]]:
    return lambda: _render_detail(moment, planned).body


def epoch_ms(value: str) -> int:
    moment = datetime.fromisoformat(value)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return round(moment.timestamp() * 1000)


def message_text(topic: str, body: dict[str, Any]) -> str:
    """One WebSocket message as Genesys frames it."""
    metadata = {"CorrelationId": str(uuid.uuid4())}
    envelope = {"topicName": topic, "version": "2", "eventBody": body, "metadata": metadata}
    return orjson.dumps(envelope).decode()


# --- the hub: channels, subscriptions, sockets, clock, knobs, stats ---------------------------------------


class TokenStore(Protocol):
    """The Simulator's token store, as the hub needs it."""

    def token_valid(self, token: str) -> bool: ...

    def invalidate_token(self, token: str) -> None: ...


class SubscriptionError(Exception):
    """A subscription request Genesys refuses; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Failure:
    """A canned error answer for the next request to one endpoint (see `NotificationsHub.fail_next`)."""

    status: int
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class RestRequest:
    """One REST request as the hub answered it."""

    endpoint: str  # one of ENDPOINTS
    method: str
    status: int
    at: float  # time.monotonic() when it arrived


@dataclass(frozen=True, slots=True)
class _Out:
    """One item of a socket's outbox: a text frame, or an instruction for the sender."""

    kind: str  # "text" | "close" | "abort" | "stall"
    text: str = ""
    counter: str = ""  # the stats field counting this frame once it is written
    code: int = 1000
    reason: str = ""


class _Socket:
    """One WebSocket on a channel. Lives on the server's loop; the hub only puts items in its outbox."""

    def __init__(self, channel_id: str, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.channel_id = channel_id
        self.ws = ws
        self.request = request
        self.outbox: asyncio.Queue[_Out] = asyncio.Queue()
        self.stalled = False
        self.last_heard = time.monotonic()


@dataclass(eq=False)
class Channel:
    id: str
    connect_uri: str
    expires: datetime
    token: str
    topics: dict[str, None] = field(default_factory=dict)  # an ordered set
    socket: _Socket | None = None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "connectUri": self.connect_uri, "expires": iso(self.expires)}


@dataclass
class HubStats:
    channels_created: int = 0
    evictions: int = 0
    channels_expired: int = 0
    channels_revoked: int = 0
    sockets_opened: int = 0
    sockets_kicked: int = 0
    sockets_closed: int = 0
    subscriptions_puts: int = 0
    subscriptions_posts: int = 0
    subscriptions_deletes: int = 0
    subscriptions_gets: int = 0
    head_requests: int = 0
    queue_requests: int = 0
    messages_sent: int = 0
    heartbeats_sent: int = 0
    pings_received: int = 0
    pings_answered: int = 0
    socket_closing_sent: int = 0
    published: int = 0
    lost_while_paused: int = 0
    lost_no_socket: int = 0


class NotificationsHub:
    """The Notifications side of the fake org. Knows the wire only; every public method is thread-safe."""

    def __init__(self, *, tokens: TokenStore, client_id: str = "sim-client") -> None:
        self.tokens = tokens
        self.client_id = client_id
        self.heartbeat_interval: float | None = 30.0
        self.answer_pings = True
        self.denied_topics: list[str] = []
        self.max_channels = MAX_CHANNELS
        self.max_topics = MAX_TOPICS
        self.channel_ttl = CHANNEL_TTL_SECONDS
        self.idle_timeout: float | None = None
        self.paused = False
        self.queues: list[dict[str, str]] = [{"id": q.id, "name": q.name} for q in QUEUES]
        self.users: list[dict[str, str]] = [{"id": a.id, "name": a.name} for a in AGENTS]
        self.clock_offset = 0.0
        self._lock = threading.RLock()
        self._channels: OrderedDict[str, Channel] = OrderedDict()  # oldest first
        self._sent_details: OrderedDict[str, set[tuple[str, str]]] = OrderedDict()
        self._stats = HubStats()
        self._failures: dict[str, deque[Failure]] = {endpoint: deque() for endpoint in ENDPOINTS}
        self._requests: deque[RestRequest] = deque(maxlen=REQUESTS_KEPT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket_count_changed = threading.Condition(self._lock)

    # --- the clock ---------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset)

    def advance(self, seconds: float) -> None:
        """Move the hub's clock; channels whose 24 h ran out close their sockets and answer 404 from now."""
        with self._lock:
            self.clock_offset += seconds
        self.sweep()

    def sweep(self) -> int:
        """Remove expired channels (closing their sockets); returns how many expired."""
        with self._lock:
            now = self.now()
            expired = [channel for channel in self._channels.values() if channel.expires <= now]
            for channel in expired:
                self._remove(channel, reason="channel expired")
                self._stats.channels_expired += 1
        for channel in expired:
            logger.info("simulator notifications channel %s expired", channel.id)
        return len(expired)

    # --- channels ----------------------------------------------------------------------------------------

    def create_channel(self, *, token: str, ws_base: str) -> Channel:
        """A new channel; at the limit the oldest one is evicted (its socket is told, then closed)."""
        self.sweep()
        channel_id = f"streaming-0-{secrets.token_hex(13)}"
        with self._lock:
            while len(self._channels) >= self.max_channels:
                self._evict(next(iter(self._channels.values())))
            channel = Channel(
                id=channel_id,
                connect_uri=f"{ws_base}/channels/{channel_id}",
                expires=self.now() + timedelta(seconds=self.channel_ttl),
                token=token,
            )
            self._channels[channel_id] = channel
            self._stats.channels_created += 1
        logger.info("simulator notifications channel %s created", channel_id)
        return channel

    def channel(self, channel_id: str) -> Channel | None:
        """The live channel with this id, or None (unknown, expired, evicted or revoked)."""
        self.sweep()
        with self._lock:
            return self._channels.get(channel_id)

    def channel_ids(self) -> list[str]:
        """Ids of the live channels, oldest first."""
        self.sweep()
        with self._lock:
            return list(self._channels)

    def topics(self, channel_id: str) -> list[str]:
        with self._lock:
            channel = self._channels.get(channel_id)
            return list(channel.topics) if channel else []

    def _evict(self, channel: Channel) -> None:
        logger.info(
            "simulator notifications channel %s evicted (over %d channels)", channel.id, self.max_channels
        )
        self._stats.evictions += 1
        if channel.socket is not None:
            self._system_message(channel, "no_longer_subscribed", "another_channel_subscribed")
        self._remove(channel, reason="no longer subscribed")

    def _remove(self, channel: Channel, *, reason: str) -> None:
        """Forget a channel (lock held); its socket gets everything already queued, then a close."""
        self._channels.pop(channel.id, None)
        if channel.socket is not None:
            self._deliver(channel.socket, _Out("close", code=1000, reason=reason))
            channel.socket = None
            self._socket_count_changed.notify_all()

    def _system_message(self, channel: Channel, topic_type: str, reason: str) -> None:
        assert channel.socket is not None
        body = {
            "channelId": channel.id,
            "systemTopicType": topic_type,
            "correlationId": str(uuid.uuid4()),
            "oauthClientId": self.client_id,
            "reason": reason,
            "message": f"{topic_type.replace('_', ' ')}: {reason.replace('_', ' ')}",
        }
        text = message_text(f"v2.system.{topic_type}.{channel.id}", body)
        self._deliver(channel.socket, _Out("text", text=text, counter="messages_sent"))

    # --- subscriptions -----------------------------------------------------------------------------------

    def subscribe(
        self, channel_id: str, topics: list[str], *, replace: bool, ignore_errors: bool
    ) -> list[dict[str, Any]]:
        """PUT (replace) or POST (add) topics; returns the ChannelTopic entities. Raises SubscriptionError."""
        self.sweep()
        with self._lock:
            channel = self._channels.get(channel_id)
            if channel is None:
                raise SubscriptionError(404, f"channel {channel_id} does not exist")
            entities = [self._topic_entity(topic) for topic in topics]
            refused = [e["id"] for e in entities if e["state"] == "Rejected"]
            if refused and not ignore_errors:
                raise SubscriptionError(400, f"Missing permissions for topics: {', '.join(refused)}")
            permitted = [e["id"] for e in entities if e["state"] == "Permitted"]
            merged = dict.fromkeys([*([] if replace else channel.topics), *permitted])
            if len(merged) > self.max_topics:
                raise SubscriptionError(400, f"A channel may subscribe to at most {self.max_topics} topics")
            channel.topics = merged
            channel.expires = self.now() + timedelta(seconds=self.channel_ttl)
            self.count("subscriptions_puts" if replace else "subscriptions_posts")
        if refused:
            logger.info("simulator notifications channel %s: rejected topics %s", channel_id, refused)
        return entities

    def _topic_entity(self, topic: str) -> dict[str, Any]:
        if not any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.denied_topics):
            return {"id": topic, "state": "Permitted"}
        permissions = [perm for pattern, perm in _PERMISSIONS if fnmatch.fnmatchcase(topic, pattern)]
        return {
            "id": topic,
            "state": "Rejected",
            "rejectionReason": "permission",
            "missingPermissions": permissions[:1] or ["notifications:topic:view"],
        }

    def clear_subscriptions(self, channel_id: str) -> bool:
        with self._lock:
            channel = self._channels.get(channel_id)
            if channel is None:
                return False
            channel.topics = {}
            self._stats.subscriptions_deletes += 1
            return True

    # --- sockets (called on the server's loop) -----------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The server's loop, where sockets live (None when the server stops)."""
        with self._lock:
            self._loop = loop

    def _attach_socket(self, sock: _Socket) -> bool:
        """Make `sock` its channel's socket; the one it replaces is drained, then closed. False: no channel"""
        with self._lock:
            channel = self._channels.get(sock.channel_id)
            if channel is None:
                return False
            old, channel.socket = channel.socket, sock
            self._stats.sockets_opened += 1
            if old is not None:
                self._stats.sockets_kicked += 1
                self._deliver(old, _Out("close", code=1000, reason="replaced by another connection"))
            self._socket_count_changed.notify_all()
        if old is not None:
            logger.info("simulator notifications channel %s: a new socket kicked the old", sock.channel_id)
        return True

    def _detach_socket(self, sock: _Socket) -> None:
        with self._lock:
            self._stats.sockets_closed += 1
            channel = self._channels.get(sock.channel_id)
            if channel is not None and channel.socket is sock:
                channel.socket = None
            self._socket_count_changed.notify_all()

    def _deliver(self, sock: _Socket, out: _Out) -> None:
        """Queue `out` for `sock` from any thread; one FIFO path keeps every socket's messages in order."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(sock.outbox.put_nowait, out)
        except RuntimeError:  # the loop closed between the check and the call: the socket is gone with it
            logger.debug("simulator notifications loop closed; message for %s dropped", sock.channel_id)

    def _sockets(self, channel_id: str | None) -> list[_Socket]:
        with self._lock:
            channels = [self._channels[channel_id]] if channel_id in self._channels else []
            if channel_id is None:
                channels = list(self._channels.values())
            return [channel.socket for channel in channels if channel.socket is not None]

    def wait_for_sockets(self, count: int, timeout: float = 5.0) -> bool:
        """Test helper: True once exactly `count` sockets are open."""
        with self._socket_count_changed:
            return self._socket_count_changed.wait_for(lambda: self._open_socket_count() == count, timeout)

    def _open_socket_count(self) -> int:
        return sum(1 for channel in self._channels.values() if channel.socket is not None)

    async def shutdown(self) -> None:
        """Close every socket (the server is stopping)."""
        for sock in self._sockets(None):
            sock.outbox.put_nowait(_Out("close", code=1001, reason="server shutting down"))

    # --- knobs -------------------------------------------------------------------------------------------

    def fail_next(
        self, endpoint: str, status: int, *, count: int = 1, retry_after: int | None = None
    ) -> None:
        """The next `count` requests to `endpoint` (one of ENDPOINTS) get `status` with a Genesys error body;
        a 429 carries Retry-After (1 s unless given), as Genesys's always does."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}")
        with self._lock:
            self._failures[endpoint].extend(Failure(status, retry_after) for _ in range(count))

    def take_failure(self, endpoint: str) -> Failure | None:
        with self._lock:
            failures = self._failures[endpoint]
            return failures.popleft() if failures else None

    def socket_closing(self, channel_id: str | None = None, *, close_after: float | None = 60.0) -> int:
        """Send v2.system.socket_closing (maintenance); close 1001 `close_after` s later (None: never)."""
        sockets = self._sockets(channel_id)
        loop = self._loop
        for sock in sockets:
            body = {"channelId": sock.channel_id, "message": "This socket will close for maintenance"}
            text = message_text(SOCKET_CLOSING_TOPIC, body)
            self._deliver(sock, _Out("text", text=text, counter="socket_closing_sent"))
            if close_after is not None and loop is not None:
                closing = _Out("close", code=1001, reason="socket closing")
                loop.call_soon_threadsafe(loop.call_later, close_after, sock.outbox.put_nowait, closing)
        return len(sockets)

    def close_socket(self, channel_id: str | None = None, code: int = 1001) -> int:
        sockets = self._sockets(channel_id)
        for sock in sockets:
            self._deliver(sock, _Out("close", code=code, reason="closed by server"))
        return len(sockets)

    def drop_socket(self, channel_id: str | None = None) -> int:
        """Abort the TCP connection without a close frame."""
        sockets = self._sockets(channel_id)
        for sock in sockets:
            self._deliver(sock, _Out("abort"))
        return len(sockets)

    def stall_socket(self, channel_id: str | None = None) -> int:
        """The socket stays open but sends nothing more: no heartbeat, no pong, no event (idle detection)."""
        sockets = self._sockets(channel_id)
        for sock in sockets:
            self._deliver(sock, _Out("stall"))
        return len(sockets)

    def revoke_token(self, channel_id: str | None = None) -> int:
        """Revoke the token behind the channel(s): v2.system.token_revoked, close, channel gone, token 401."""
        with self._lock:
            channels = [c for c in self._channels.values() if channel_id is None or c.id == channel_id]
            for channel in channels:
                if channel.socket is not None:
                    self._system_message(channel, "token_revoked", "user_tokens_revoked")
                self._remove(channel, reason="token revoked")
                self._stats.channels_revoked += 1
            tokens = {channel.token for channel in channels}
        for token in tokens:
            self.tokens.invalidate_token(token)
        logger.info("simulator notifications revoked the token of %d channel(s)", len(channels))
        return len(channels)

    # --- publishing ----------------------------------------------------------------------------------------

    def publish(self, payload: Any) -> int:
        """Turn one SSE lifecycle payload into notifications for subscribed sockets; returns frames queued."""
        if not is_lifecycle(payload):
            return 0
        try:
            moment = _Moment(payload)
            planned = _planned_details(moment)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning(
                "simulator notifications: payload of conversation %s not rendered (%s: %s)",
                payload.get("conversationId"), type(exc).__name__, exc,
            )
            return 0
        # Rendered only for topics someone subscribed to: most payloads of a big demo log reach no channel.
        snapshot = functools.cache(lambda: conversation_snapshot(payload))
        messages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (topic, snapshot) for topic in _topics(moment.participants)
        ]
        with self._lock:
            self._stats.published += 1
            for event in self._first_time(moment.conversation_id, planned):
                topic = detail_topic(moment.conversation_id, event.kind)
                messages.append((topic, _detail_body(moment, event)))
            return self._fan_out(messages)

    def _first_time(self, conversation_id: str, planned: list[_Planned]) -> list[_Planned]:
        """Detail events not sent before (lock held); remembered even while paused, so a gap stays a gap."""
        sent = self._sent_details.setdefault(conversation_id, set())
        self._sent_details.move_to_end(conversation_id)
        while len(self._sent_details) > 50_000:
            self._sent_details.popitem(last=False)
        fresh = [event for event in planned if event.key not in sent]
        sent.update(event.key for event in fresh)
        return fresh

    def _fan_out(self, messages: list[tuple[str, Callable[[], dict[str, Any]]]]) -> int:
        """Queue each (topic, body) for every channel subscribed to it (lock held, so a kick is atomic)."""
        queued = 0
        for topic, body in messages:
            channels = [channel for channel in self._channels.values() if topic in channel.topics]
            if not channels:
                continue
            if self.paused:
                self._stats.lost_while_paused += len(channels)
                continue
            text = message_text(topic, body())
            for channel in channels:
                if channel.socket is None:
                    self._stats.lost_no_socket += 1
                    continue
                self._deliver(channel.socket, _Out("text", text=text, counter="messages_sent"))
                queued += 1
        return queued

    # --- stats ---------------------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """A copy of the counters plus open_sockets {channel: 0|1} and topics_per_channel {channel: n}."""
        with self._lock:
            snapshot: dict[str, Any] = dict(vars(self._stats))
            snapshot["open_sockets"] = {cid: int(c.socket is not None) for cid, c in self._channels.items()}
            snapshot["topics_per_channel"] = {cid: len(c.topics) for cid, c in self._channels.items()}
        return snapshot

    def requests(self, endpoint: str | None = None) -> list[RestRequest]:
        """The REST requests answered so far (all, or one endpoint's), oldest first."""
        with self._lock:
            return [r for r in self._requests if endpoint is None or r.endpoint == endpoint]

    def record_request(self, request: RestRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def count(self, name: str, amount: int = 1) -> None:
        """Add to one of the HubStats counters (the routes count their requests here)."""
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + amount)

    # --- serving one socket (on the loop) ------------------------------------------------------------------

    async def serve_socket(self, request: web.Request, channel_id: str) -> web.WebSocketResponse | None:
        """Run one WebSocket until it closes; None (answer 404) when the channel does not exist."""
        ws = web.WebSocketResponse(timeout=2.0, autoping=True, compress=False)
        sock = _Socket(channel_id, ws, request)
        # Attached before the handshake, so nothing published once the client sees the socket open is missed.
        if not self._attach_socket(sock):
            return None
        try:
            await ws.prepare(request)
        except (ConnectionError, web.HTTPException):
            self._detach_socket(sock)
            raise
        logger.info("simulator notifications socket opened on channel %s", channel_id)
        tasks = [asyncio.create_task(self._send_loop(sock)), asyncio.create_task(self._timer_loop(sock))]
        try:
            await self._read_loop(sock)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._detach_socket(sock)
            logger.info(
                "simulator notifications socket on channel %s closed (code %s)", channel_id, ws.close_code
            )
        return ws

    async def _read_loop(self, sock: _Socket) -> None:
        async for message in sock.ws:
            sock.last_heard = time.monotonic()
            if message.type is WSMsgType.TEXT and _is_ping(message.data):
                self.count("pings_received")
                if self.answer_pings and not sock.stalled:
                    sock.outbox.put_nowait(_Out("text", text=PONG_TEXT, counter="pings_answered"))

    async def _send_loop(self, sock: _Socket) -> None:
        while True:
            out = await sock.outbox.get()
            if out.kind == "stall":
                sock.stalled = True
            elif out.kind == "abort":
                await _abort(sock)
                return
            elif out.kind == "close":
                await sock.ws.close(code=out.code, message=out.reason.encode())
                return
            elif not sock.stalled and not sock.ws.closed:
                try:
                    await sock.ws.send_str(out.text)
                except ConnectionError:
                    logger.info("simulator notifications socket on %s went away mid-send", sock.channel_id)
                    return
                self.count(out.counter)

    async def _timer_loop(self, sock: _Socket) -> None:
        """A heartbeat every heartbeat_interval s; a 1001 close once the client was silent idle_timeout s."""
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            interval = self.heartbeat_interval
            if interval is not None and now - last_beat >= interval:
                last_beat = now
                sock.outbox.put_nowait(_Out("text", text=HEARTBEAT_TEXT, counter="heartbeats_sent"))
            if self.idle_timeout is not None and now - sock.last_heard >= self.idle_timeout:
                logger.info("simulator notifications socket on %s idle; closing 1001", sock.channel_id)
                sock.outbox.put_nowait(_Out("close", code=1001, reason="idle"))
                return

    async def run_sweeper(self, interval: float = 0.5) -> None:
        """Expire channels as time passes (advance() sweeps at once)."""
        while True:
            await asyncio.sleep(interval)
            self.sweep()


def _is_ping(text: str) -> bool:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("message") == "ping"


async def _abort(sock: _Socket) -> None:
    transport = sock.request.transport
    if transport is not None:
        logger.info("simulator notifications dropping the socket on %s (no close frame)", sock.channel_id)
        transport.abort()


# --- REST and WebSocket routes ----------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NotificationsRoutes:
    """The Notifications REST API, the queue and user listings, and /channels/{id}, on the simulator's app."""

    def __init__(
        self,
        hub: NotificationsHub,
        *,
        authorized: Callable[[web.Request], bool],
        error: Callable[..., web.Response],
    ) -> None:
        self.hub = hub
        self._authorized = authorized
        self._error = error

    def mount(self, app: web.Application) -> None:
        channels = "/api/v2/notifications/channels"
        subscriptions = channels + "/{channel_id}/subscriptions"
        rest: list[tuple[str, str, str, Handler]] = [
            ("POST", channels, "create_channel", self.create_channel),
            ("GET", channels, "list_channels", self.list_channels),
            ("HEAD", channels + "/{channel_id}", "head_channel", self.head_channel),
            ("GET", subscriptions, "subscriptions", self.get_subscriptions),
            ("PUT", subscriptions, "subscriptions", self.put_subscriptions),
            ("POST", subscriptions, "subscriptions", self.post_subscriptions),
            ("DELETE", subscriptions, "subscriptions", self.delete_subscriptions),
            ("GET", "/api/v2/routing/queues", "queues", self.list_queues),
            ("GET", "/api/v2/routing/queues/{queue_id}", "queues", self.get_queue),
            ("GET", "/api/v2/users", "users", self.list_users),
        ]
        for method, path, endpoint, handler in rest:
            app.router.add_route(method, path, self._answered(endpoint, handler))
        app.router.add_get("/channels/{channel_id}", self.socket, allow_head=False)

    def _answered(self, endpoint: str, handler: Handler) -> Handler:
        """`handler` behind the endpoint's canned failures (fail_next); each answer recorded with its time."""

        async def answer(request: web.Request) -> web.StreamResponse:
            arrived = time.monotonic()
            failure = self.hub.take_failure(endpoint)
            if failure is None:
                response = await handler(request)
            else:
                logger.info("simulator answering %s %s with %d (fail_next)", request.method, request.path,
                            failure.status)
                response = self._error(failure.status, retry_after=failure.retry_after)
            self.hub.record_request(RestRequest(endpoint, request.method, response.status, arrived))
            return response

        return answer

    async def create_channel(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        token = request.headers["Authorization"].partition(" ")[2].strip()
        channel = self.hub.create_channel(token=token, ws_base=f"ws://{request.host}")
        return _json(200, channel.as_json())

    async def list_channels(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        entities = [c.as_json() for cid in self.hub.channel_ids() if (c := self.hub.channel(cid)) is not None]
        return _json(200, {"entities": entities})

    async def head_channel(self, request: web.Request) -> web.Response:
        self.hub.count("head_requests")
        if not self._authorized(request):
            return web.Response(status=401)
        return web.Response(status=200 if self.hub.channel(request.match_info["channel_id"]) else 404)

    async def get_subscriptions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        channel_id = request.match_info["channel_id"]
        if self.hub.channel(channel_id) is None:
            return self._error(404)
        self.hub.count("subscriptions_gets")
        base = f"/api/v2/notifications/channels/{channel_id}/subscriptions"
        entities = [{"id": topic, "selfUri": f"{base}/{topic}"} for topic in self.hub.topics(channel_id)]
        return _json(200, {"entities": entities})

    async def put_subscriptions(self, request: web.Request) -> web.Response:
        return await self._subscribe(request, replace=True)

    async def post_subscriptions(self, request: web.Request) -> web.Response:
        return await self._subscribe(request, replace=False)

    async def _subscribe(self, request: web.Request, *, replace: bool) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        topics = _topic_ids(await request.read())
        if topics is None:
            return self._error(400, message='The body must be a JSON list of {"id": "<topic>"} objects')
        ignore_errors = request.query.get("ignoreErrors", "false").lower() == "true"
        try:
            entities = self.hub.subscribe(
                request.match_info["channel_id"], topics, replace=replace, ignore_errors=ignore_errors
            )
        except SubscriptionError as exc:
            return self._error(exc.status, message=exc.message)
        return _json(200, {"entities": entities})

    async def delete_subscriptions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        if not self.hub.clear_subscriptions(request.match_info["channel_id"]):
            return self._error(404)
        return web.Response(status=204)

    async def list_queues(self, request: web.Request) -> web.Response:
        self.hub.count("queue_requests")
        queues = sorted(self.hub.queues, key=lambda q: q["name"])
        return self._listing(request, queues, "/api/v2/routing/queues")

    async def get_queue(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        queue = next((q for q in self.hub.queues if q["id"] == request.match_info["queue_id"]), None)
        if queue is None:
            return self._error(404)
        return _json(200, {**queue, "selfUri": f"/api/v2/routing/queues/{queue['id']}"})

    async def list_users(self, request: web.Request) -> web.Response:
        return self._listing(request, sorted(self.hub.users, key=lambda u: u["name"]), "/api/v2/users")

    def _listing(self, request: web.Request, items: list[dict[str, str]], path: str) -> web.Response:
        if not self._authorized(request):
            return self._error(401)
        try:
            page_size = int(request.query.get("pageSize", "25"))
            page_number = int(request.query.get("pageNumber", "1"))
        except ValueError:
            return self._error(400, message="pageSize and pageNumber must be integers")
        if not (1 <= page_size <= MAX_PAGE_SIZE and page_number >= 1):
            return self._error(400, message=f"pageSize must be 1..{MAX_PAGE_SIZE} and pageNumber at least 1")
        return _json(200, paged(items, path=path, page_size=page_size, page_number=page_number))

    async def socket(self, request: web.Request) -> web.StreamResponse:
        ws = await self.hub.serve_socket(request, request.match_info["channel_id"])
        return ws if ws is not None else self._error(404)


def paged(items: list[dict[str, str]], *, path: str, page_size: int, page_number: int) -> dict[str, Any]:
    """A Genesys entity listing page: entities with selfUri, counts and the navigation uris."""
    page_count = math.ceil(len(items) / page_size)
    start = (page_number - 1) * page_size
    entities = [{**item, "selfUri": f"{path}/{item['id']}"} for item in items[start : start + page_size]]

    def uri(number: int) -> str:
        return f"{path}?pageSize={page_size}&pageNumber={number}"

    listing: dict[str, Any] = {
        "entities": entities,
        "pageSize": page_size,
        "pageNumber": page_number,
        "total": len(items),
        "pageCount": page_count,
        "firstUri": uri(1),
        "selfUri": uri(page_number),
        "lastUri": uri(max(page_count, 1)),
    }
    if page_number < page_count:
        listing["nextUri"] = uri(page_number + 1)
    if page_number > 1:
        listing["previousUri"] = uri(page_number - 1)
    return listing


def _topic_ids(body: bytes) -> list[str] | None:
    """The topic ids of a subscription body ([{"id": topic}, ...]), or None when it is not that."""
    try:
        data = orjson.loads(body or b"null")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, list):
        return None
    if not all(isinstance(item, dict) and isinstance(item.get("id"), str) for item in data):
        return None
    return [item["id"] for item in data]


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
