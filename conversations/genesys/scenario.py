"""Realistic conversation lifecycles for the Genesys simulator, told one SSE payload at a time.

A lifecycle follows the contract in INTERFACES.md: start -> update (agent connected) -> [update (transfer)]
-> end -> wrapup. With `reject_rate`, an inbound conversation may first be offered to an agent who rejects it
(an agent participant with an endTime and no connectedTime in the connect update); the rate is 0 by default.
Voice, chat and callback, inbound and outbound, several queues and agents, wrap-up codes
with names, and names that are not ASCII (a monitor that mangles "Zoë Ó Briain" or "李雷" is broken).

Everything random comes from one `random.Random`, so a seed gives the same conversations every time.
The timestamp of each event is chosen by the caller: a synthetic clock for a batch (`Scenario.timeline`),
the wall clock for live generation (`ConversationScript.next_event(at=now)`).
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# Ids of the catalog (queues, agents, wrap-up codes) do not depend on the seed: a wrap-up code id seen
# in one run resolves to the same name in every run, like a real org's configuration.
_CATALOG_NAMESPACE = uuid.UUID("6f1c2a9e-3b7d-4e0a-9c55-0d3f2b8e7a41")

# A fixed morning in the past, so a seed always gives the same payloads and no timestamp is in the future.
DEFAULT_START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
EVENT_TYPES = ("conversation:start", "conversation:update", "conversation:end", "conversation:wrapup")


def catalog_id(kind: str, name: str) -> str:
    """A stable uuid for a catalog item, the same in every run."""
    return str(uuid.uuid5(_CATALOG_NAMESPACE, f"{kind}:{name}"))


def iso(at: datetime) -> str:
    """ISO 8601 UTC with milliseconds and 'Z', e.g. 2026-11-28T09:00:00.123Z."""
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def to_millis(at: datetime) -> datetime:
    """Drop sub-millisecond precision, which the wire format cannot carry."""
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


@dataclass(frozen=True, slots=True)
class Queue:
    id: str
    name: str
    country_code: str  # E.164 prefix used for the queue's own number and its customers' numbers
    number: str  # the queue's DNIS

    @classmethod
    def make(cls, name: str, country_code: str, number: str) -> Queue:
        return cls(id=catalog_id("queue", name), name=name, country_code=country_code, number=number)


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    name: str
    queue_names: tuple[str, ...]

    @classmethod
    def make(cls, name: str, *queue_names: str) -> Agent:
        return cls(id=catalog_id("user", name), name=name, queue_names=queue_names)


@dataclass(frozen=True, slots=True)
class WrapupCode:
    id: str
    name: str

    @classmethod
    def make(cls, name: str) -> WrapupCode:
        return cls(id=catalog_id("wrapupcode", name), name=name)


QUEUES: tuple[Queue, ...] = (
    Queue.make("Support Ireland", "+3531", "tel:+35318880000"),
    Queue.make("Billing UK", "+4420", "tel:+442079460000"),
    Queue.make("Service Client Île-de-France", "+331", "tel:+33155550000"),
    Queue.make("Kundenservice München", "+4989", "tel:+49895550000"),
    Queue.make("Atención al Cliente España", "+3491", "tel:+34915550000"),
    Queue.make("Kundeservice Ærøskøbing", "+4562", "tel:+4562520000"),
)
_QUEUE_BY_NAME = {queue.name: queue for queue in QUEUES}

AGENTS: tuple[Agent, ...] = (
    Agent.make("Zoë Ó Briain", "Support Ireland", "Billing UK"),
    Agent.make("Siobhán Ní Dhubhghaill", "Support Ireland"),
    Agent.make("José Álvarez Peña", "Atención al Cliente España", "Support Ireland"),
    Agent.make("李雷", "Support Ireland", "Billing UK"),
    Agent.make("Renée Lefèvre", "Service Client Île-de-France"),
    Agent.make("Jürgen Groß", "Kundenservice München", "Billing UK"),
    Agent.make("Åse Ærøskøbing", "Kundeservice Ærøskøbing", "Kundenservice München"),
    Agent.make("Ciarán O'Connor", "Billing UK", "Support Ireland"),
    Agent.make("Łucja Wiśniewska", "Kundenservice München", "Service Client Île-de-France"),
    Agent.make("Nguyễn Thị Hà", "Atención al Cliente España", "Billing UK"),
)

WRAPUP_CODES: tuple[WrapupCode, ...] = tuple(
    WrapupCode.make(name)
    for name in (
        "Resolved",
        "Escalated",
        "Callback scheduled",
        "Billing query",
        "Sale completed",
        "Réclamation",
        "No answer",
        "Wrong number",
    )
)
WRAPUP_CODE_NAMES: dict[str, str] = {code.id: code.name for code in WRAPUP_CODES}

CUSTOMER_NAMES = (
    "Zoë Ó Briain",
    "Seán Mac Giolla Phádraig",
    "Chloé Dubois",
    "Jürgen Müller",
    "王芳",
    "María José Núñez",
    "Ingrid Ærøskøbing",
    "Αλέξανδρος Παπαδόπουλος",
    "Ольга Петрова",
    "محمد الحربي",
    "Þórunn Guðmundsdóttir",
    "O'Brien, Aoife",
    "John Smith",
    "Émile \"Milo\" Zola",
)

WRAPUP_NOTES = (
    "Issue fixed on the first call.",
    "Customer happy — refund of €12.50 issued.",
    "Client rappelé à 15h, dossier clos.",
    "Kunde möchte einen Rückruf am Montag.",
    "客户满意，问题已解决。",  # noqa: RUF001 (a Chinese comma is the point)
    "Escalated to tier 2 (ticket #4711).",
    "",
    "Line dropped twice; asked to use chat next time.",
    "Cliente satisfecho. Ñandú 🦤 mencionado.",
)

# Media mix and the direction of each medium: most traffic is inbound voice.
_MEDIA_WEIGHTS = (("voice", 6), ("chat", 3), ("callback", 2))
_TRANSFER_PROBABILITY = 0.3
_IVR_PROBABILITY = 0.5


@dataclass(frozen=True, slots=True)
class Rejection:
    """An agent who was offered the conversation and rejected it before the answering agent connected."""

    agent: Agent
    participant_id: str
    at_fraction: float  # where between routing and the answer the offer ended


class ConversationScript:
    """One conversation's story, told one event at a time; the caller picks each event's time."""

    def __init__(self, rng: random.Random, *, reject_rate: float = 0.0) -> None:
        self._rng = rng
        self.conversation_id = _uuid4(rng)
        self.media_type = _weighted(rng, _MEDIA_WEIGHTS)
        self.direction = self._pick_direction()
        self.queue = rng.choice(QUEUES)
        self._agents = self._pick_agents()
        self._wrapup = rng.choice(WRAPUP_CODES)
        self._notes = rng.choice(WRAPUP_NOTES)
        self._ani, self._dnis = self._numbers()
        self._rejection = self._pick_rejection(reject_rate)
        self._participants: list[dict[str, Any]] = []
        self._steps = self._plan_steps()
        self._last: datetime | None = None
        self._ended_at: datetime | None = None

    @property
    def done(self) -> bool:
        return not self._steps

    def next_event(self, at: datetime) -> dict[str, Any]:
        """The next payload of this conversation, stamped `at` (nudged to stay strictly increasing)."""
        at = self._strictly_after_last(to_millis(at))
        step = self._steps.pop(0)
        event_type = getattr(self, f"_step_{step}")(at)
        self._last = at
        return self._payload(event_type, at)

    def next_gap(self) -> timedelta:
        """A realistic pause before the next step, for callers that keep a synthetic clock."""
        if not self._steps:
            return timedelta(0)
        low, high = {"connect": (3, 60), "transfer": (30, 300), "end": (30, 600), "wrapup": (5, 90)}.get(
            self._steps[0], (1, 10)
        )
        return timedelta(seconds=self._rng.uniform(low, high))

    # --- planning -------------------------------------------------------------------------------------

    def _pick_direction(self) -> str:
        outbound_share = {"voice": 0.25, "chat": 0.0, "callback": 0.7}[self.media_type]
        return "outbound" if self._rng.random() < outbound_share else "inbound"

    def _pick_agents(self) -> list[tuple[Agent, Queue]]:
        """The agent who answers, then maybe a second one (possibly in another queue) after a transfer."""
        first = self._rng.choice([agent for agent in AGENTS if self.queue.name in agent.queue_names])
        agents = [(first, self.queue)]
        if self._rng.random() < _TRANSFER_PROBABILITY:
            second = self._rng.choice([agent for agent in AGENTS if agent is not first])
            agents.append((second, _QUEUE_BY_NAME[self._rng.choice(second.queue_names)]))
        return agents

    def _pick_rejection(self, reject_rate: float) -> Rejection | None:
        """Drawn from a generator of its own, so a rate of 0 leaves every seeded story exactly as it was."""
        if reject_rate <= 0 or self._outbound_call:
            return None
        side = random.Random(self.conversation_id)
        first = self._agents[0][0]
        others = [agent for agent in AGENTS if self.queue.name in agent.queue_names and agent is not first]
        if side.random() >= reject_rate or not others:
            return None
        agent = side.choice(others)
        return Rejection(agent=agent, participant_id=_uuid4(side), at_fraction=side.uniform(0.2, 0.8))

    def _numbers(self) -> tuple[str | None, str | None]:
        if self.media_type == "chat":
            return None, None
        customer = f"tel:{self.queue.country_code}555{self._rng.randrange(10_000):04d}"
        if self.direction == "outbound":
            return self.queue.number, customer
        return customer, self.queue.number

    def _plan_steps(self) -> list[str]:
        transfers = ["transfer"] * (len(self._agents) - 1)
        return ["start", "connect", *transfers, "end", "wrapup"]

    # --- steps: each changes the participants and returns the event type -----------------------------

    def _step_start(self, at: datetime) -> str:
        customer_connected = None if self._outbound_call else iso(at)
        customer = self._participant("customer", name=self._customer_name(), connected=customer_connected)
        self._participants.append(customer)
        if self._outbound_call:
            agent, queue = self._agents[0]
            self._participants.append(self._agent_participant(agent, queue, at))
        elif self.media_type == "voice" and self._rng.random() < _IVR_PROBABILITY:
            self._participants.append(self._participant("ivr", name="Main IVR", connected=iso(at)))
        else:
            self._participants.append(self._acd_participant(iso(at)))
        return "conversation:start"

    def _step_connect(self, at: datetime) -> str:
        if self._outbound_call:
            self._by_purpose("customer")["connectedTime"] = iso(at)
            return "conversation:update"
        ivr = self._find_purpose("ivr")
        if ivr is not None:
            routed = self._between(ivr["connectedTime"], at)
            ivr["endTime"] = routed
            self._participants.append(self._acd_participant(routed))
        acd = self._by_purpose("acd")
        if self._rejection is not None:
            self._participants.append(self._rejected_offer(self._rejection, acd["connectedTime"], at))
        acd["endTime"] = iso(at)
        agent, queue = self._agents[0]
        self._participants.append(self._agent_participant(agent, queue, at))
        return "conversation:update"

    def _step_transfer(self, at: datetime) -> str:
        current = [p for p in self._participants if p["purpose"] == "agent" and "endTime" not in p][-1]
        current["endTime"] = iso(at)
        answered = [p for p in self._participants if p["purpose"] == "agent" and "connectedTime" in p]
        agent, queue = self._agents[len(answered)]
        self.queue = queue
        self._participants.append(self._agent_participant(agent, queue, at))
        return "conversation:update"

    def _step_end(self, at: datetime) -> str:
        for participant in self._participants:
            participant.setdefault("endTime", iso(at))
        self._ended_at = at
        return "conversation:end"

    def _step_wrapup(self, at: datetime) -> str:
        return "conversation:wrapup"

    # --- rendering --------------------------------------------------------------------------------------

    def _payload(self, event_type: str, at: datetime) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "eventType": event_type,
            "conversationId": self.conversation_id,
            "timestamp": iso(at),
            "mediaType": self.media_type,
            "direction": self.direction,
        }
        if self._ani is not None:
            payload["ani"] = self._ani
            payload["dnis"] = self._dnis
        payload["queueId"] = self.queue.id
        payload["queueName"] = self.queue.name
        payload["participants"] = [dict(participant) for participant in self._participants]
        if event_type == "conversation:wrapup":
            payload["wrapup"] = self._wrapup_block(at)
        return payload

    def _wrapup_block(self, at: datetime) -> dict[str, Any]:
        ended_at = self._ended_at or at
        return {
            "code": self._wrapup.id,
            "name": self._wrapup.name,
            "notes": self._notes,
            "durationSeconds": max(0, round((at - ended_at).total_seconds())),
        }

    def _participant(
        self,
        purpose: str,
        *,
        name: str,
        connected: str | None,
        queue_id: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        participant: dict[str, Any] = {"participantId": _uuid4(self._rng), "purpose": purpose}
        if user_id is not None:
            participant["userId"] = user_id
        participant["name"] = name
        if queue_id is not None:
            participant["queueId"] = queue_id
        if connected is not None:
            participant["connectedTime"] = connected
        return participant

    def _agent_participant(self, agent: Agent, queue: Queue, at: datetime) -> dict[str, Any]:
        return self._participant(
            "agent", name=agent.name, queue_id=queue.id, user_id=agent.id, connected=iso(at)
        )

    def _rejected_offer(self, rejection: Rejection, routed: str, answered: datetime) -> dict[str, Any]:
        """The rejecting agent: offered after routing, gone before the answer, never connected."""
        start = datetime.fromisoformat(routed)
        ended = iso(start + (answered - start) * rejection.at_fraction)
        return {
            "participantId": rejection.participant_id,
            "purpose": "agent",
            "userId": rejection.agent.id,
            "name": rejection.agent.name,
            "queueId": self.queue.id,
            "endTime": ended,
        }

    def _acd_participant(self, connected: str) -> dict[str, Any]:
        return self._participant("acd", name=self.queue.name, queue_id=self.queue.id, connected=connected)

    def _customer_name(self) -> str:
        return self._rng.choice(CUSTOMER_NAMES)

    @property
    def _outbound_call(self) -> bool:
        """Outbound voice and callbacks start with the agent dialling; the customer answers later."""
        return self.direction == "outbound"

    def _find_purpose(self, purpose: str) -> dict[str, Any] | None:
        return next((p for p in self._participants if p["purpose"] == purpose), None)

    def _by_purpose(self, purpose: str) -> dict[str, Any]:
        participant = self._find_purpose(purpose)
        if participant is None:
            raise LookupError(f"conversation {self.conversation_id} has no {purpose} participant")
        return participant

    def _between(self, earlier: str, later: datetime) -> str:
        """A time strictly between an earlier ISO time and `later` when there is room (the IVR hand-off)."""
        start = datetime.fromisoformat(earlier)
        span = (later - start).total_seconds()
        return iso(start + timedelta(seconds=span * self._rng.uniform(0.3, 0.9)))

    def _strictly_after_last(self, at: datetime) -> datetime:
        if self._last is not None and at <= self._last:
            return self._last + timedelta(milliseconds=1)
        return at


class Scenario:
    """Deterministic source of conversation lifecycles: the same seed gives the same payloads."""

    def __init__(self, seed: int | None = None, *, reject_rate: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.reject_rate = reject_rate  # share of inbound conversations first offered to an agent who rejects

    def script(self) -> ConversationScript:
        return ConversationScript(self.rng, reject_rate=self.reject_rate)

    def lifecycle(self, *, start: datetime = DEFAULT_START) -> list[dict[str, Any]]:
        """Every payload of one conversation, on a realistic synthetic clock from `start`."""
        script = self.script()
        at, payloads = start, []
        while not script.done:
            payloads.append(script.next_event(at))
            at += script.next_gap()
        return payloads

    def timeline(self, conversations: int, *, start: datetime = DEFAULT_START) -> list[dict[str, Any]]:
        """`conversations` lifecycles arriving a few seconds apart, interleaved in timestamp order."""
        arrivals, events = start, []
        for _ in range(conversations):
            events.extend(self.lifecycle(start=arrivals))
            arrivals += timedelta(seconds=self.rng.expovariate(1 / 20))
        # The sort is stable and timestamps increase within a conversation, so each lifecycle keeps its order.
        return sorted(events, key=lambda payload: payload["timestamp"])


def _uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _weighted(rng: random.Random, choices: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([value for value, _ in choices], weights=[weight for _, weight in choices])[0]
