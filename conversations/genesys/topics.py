"""The Notifications topic budget: which topics go on which channel, within Genesys's limits.

Limits (../shared/genesys/README.md, section 4): at most 1,000 topics per channel and 20 channels per OAuth
client. The base topics (one per watched queue and user) are spread evenly over as few channels as hold them;
each conversation's detail-event topics are added to a channel with room once the conversation is discovered,
kept together, and dropped once it is wrapped up (or has been ended for `ended_grace` seconds). A limit is never
exceeded: a conversation that finds no room is followed by its snapshots only, with a warning.

Pure bookkeeping, no I/O; thread-safe (the reader thread follows conversations, the channel tasks read plans).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_TOPICS_PER_CHANNEL = 1000
MAX_CHANNELS = 20
# Warn once a channel or the channel count passes this share of its limit.
WARN_RATIO = 0.9
# The detail events the normalizer understands; each is its own topic.
DETAIL_EVENT_TYPES = (
    "customer.start", "customer.end", "acd.start", "acd.end", "user.start", "user.end", "acw", "wrapup",
)
# Conversations already followed and let go; a late snapshot of one of them does not follow it again.
FINISHED_MEMORY = 20_000


def queue_topic(queue_id: str) -> str:
    return f"v2.routing.queues.{queue_id}.conversations"


def user_topic(user_id: str) -> str:
    return f"v2.users.{user_id}.conversations"


def detail_topics(conversation_id: str, types: Iterable[str] = DETAIL_EVENT_TYPES) -> list[str]:
    return [f"v2.detail.events.conversation.{conversation_id}.{kind}" for kind in types]


class TopicLimitError(ValueError):
    """The base topics alone do not fit in every channel the client may open."""


@dataclass
class Slot:
    """One channel's share of the topics (the channel itself may be replaced; its slot stays)."""

    base: list[str] = field(default_factory=list)
    conversations: dict[str, list[str]] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so a channel task knows when to re-subscribe
    warned: bool = False

    @property
    def size(self) -> int:
        return len(self.base) + sum(len(topics) for topics in self.conversations.values())

    def topics(self) -> list[str]:
        return [*self.base, *(t for topics in self.conversations.values() for t in topics)]


class TopicBudget:
    def __init__(
        self,
        base_topics: Sequence[str],
        *,
        max_topics: int = MAX_TOPICS_PER_CHANNEL,
        max_channels: int = MAX_CHANNELS,
        detail_types: Sequence[str] = DETAIL_EVENT_TYPES,
        ended_grace: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_topics < 1 or max_channels < 1:
            raise ValueError(f"limits must be positive, not {max_topics} topics x {max_channels} channels")
        self.max_topics = max_topics
        self.max_channels = max_channels
        self.detail_types = tuple(detail_types)
        self.ended_grace = ended_grace
        self._clock = clock
        self._lock = threading.Lock()
        self._slots = [Slot(base=chunk) for chunk in spread(list(dict.fromkeys(base_topics)), max_topics, max_channels)]
        self._home: dict[str, int] = {}  # conversation id -> slot index
        self._ended: dict[str, float] = {}  # conversation id -> when it was seen ended (clock)
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._channels_warned = False
        self.dropped_no_room = 0
        self.details_enabled = bool(self.detail_types)
        for index in range(len(self._slots)):
            self._warn_slot(index)
        self._warn_channels()

    # -- reads (channel tasks) --------------------------------------------------------------------------

    @property
    def slot_count(self) -> int:
        with self._lock:
            return len(self._slots)

    def plan(self, slot: int) -> tuple[int, list[str]]:
        """(version, topics) the channel of this slot should be subscribed to."""
        with self._lock:
            entry = self._slots[slot]
            return entry.version, entry.topics()

    def sizes(self) -> list[int]:
        with self._lock:
            return [slot.size for slot in self._slots]

    def following(self) -> int:
        with self._lock:
            return len(self._home)

    # -- writes (the reader thread, as conversations come and go) ------------------------------------------

    def follow(self, conversation_id: str) -> bool:
        """Add a conversation's detail topics to a channel with room; False when it is not (or no longer) followed."""
        with self._lock:
            if conversation_id in self._home:
                return True
            if conversation_id in self._finished or not self.details_enabled:
                return False
            index = self._slot_with_room(len(self.detail_types))
            if index is None:
                self.dropped_no_room += 1
                logger.warning(
                    "notifications: no room for the detail topics of conversation %s (%d channels x %d topics "
                    "full); it is followed by its snapshots only (%d such so far)",
                    conversation_id, len(self._slots), self.max_topics, self.dropped_no_room,
                )
                return False
            slot = self._slots[index]
            slot.conversations[conversation_id] = detail_topics(conversation_id, self.detail_types)
            slot.version += 1
            self._home[conversation_id] = index
            self._warn_slot(index)
            return True

    def disable_details(self) -> list[int]:
        """Stop following conversations (their topics are refused); returns the slots that changed."""
        with self._lock:
            self.details_enabled = False
            changed = sorted(set(self._home.values()))
            for conversation_id in list(self._home):
                self._finish(conversation_id)
            return changed

    def ended(self, conversation_id: str) -> None:
        """The conversation ended; its topics go after `ended_grace` unless its wrap-up comes first."""
        with self._lock:
            if conversation_id in self._home:
                self._ended.setdefault(conversation_id, self._clock())

    def finish(self, conversation_id: str) -> bool:
        """Drop a conversation's detail topics (it is wrapped up); True when it had some."""
        with self._lock:
            return self._finish(conversation_id)

    def expire_ended(self) -> list[str]:
        """Drop the topics of conversations ended longer than `ended_grace` ago (no wrap-up came)."""
        with self._lock:
            deadline = self._clock() - self.ended_grace
            stale = [cid for cid, at in self._ended.items() if at <= deadline]
            for conversation_id in stale:
                self._finish(conversation_id)
            return stale

    # -- internals --------------------------------------------------------------------------------------

    def _finish(self, conversation_id: str) -> bool:
        self._remember_finished(conversation_id)
        self._ended.pop(conversation_id, None)
        index = self._home.pop(conversation_id, None)
        if index is None:
            return False
        slot = self._slots[index]
        del slot.conversations[conversation_id]
        slot.version += 1
        if slot.size < self.max_topics * (WARN_RATIO - 0.1):
            slot.warned = False
        return True

    def _remember_finished(self, conversation_id: str) -> None:
        self._finished[conversation_id] = None
        self._finished.move_to_end(conversation_id)
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _slot_with_room(self, needed: int) -> int | None:
        """The fullest slot that still has room (keeps others free), else a new slot while channels are left."""
        candidates = [(slot.size, i) for i, slot in enumerate(self._slots) if slot.size + needed <= self.max_topics]
        if candidates:
            return max(candidates)[1]
        if len(self._slots) >= self.max_channels or needed > self.max_topics:
            return None
        self._slots.append(Slot())
        logger.info("notifications: opening channel slot %d for detail topics (%d topics per channel max)",
                    len(self._slots) - 1, self.max_topics)
        self._warn_channels()
        return len(self._slots) - 1

    def _warn_slot(self, index: int) -> None:
        slot = self._slots[index]
        if not slot.warned and slot.size >= self.max_topics * WARN_RATIO:
            slot.warned = True
            logger.warning("notifications: channel slot %d holds %d of %d topics", index, slot.size, self.max_topics)

    def _warn_channels(self) -> None:
        if not self._channels_warned and len(self._slots) >= math.ceil(self.max_channels * WARN_RATIO):
            self._channels_warned = True
            logger.warning(
                "notifications: %d of %d channels in use for this OAuth client; a 21st channel evicts the oldest "
                "(other processes using the same client count too)", len(self._slots), self.max_channels,
            )


def spread(topics: list[str], max_topics: int, max_channels: int) -> list[list[str]]:
    """Split topics evenly over as few channels as hold them (at least one channel)."""
    channels = max(1, math.ceil(len(topics) / max_topics))
    if channels > max_channels:
        raise TopicLimitError(
            f"{len(topics)} queue and user topics need {channels} channels of {max_topics} topics, more than the "
            f"{max_channels} channels an OAuth client may have; narrow them with GENESYS_QUEUE_IDS"
        )
    size = math.ceil(len(topics) / channels) if topics else 0
    return [topics[i * size:(i + 1) * size] for i in range(channels)]
