"""Live broadcast: after each batch commits, snapshots of the conversations it moved go to channel-layer groups.

The ingest worker's writer thread calls `Publisher.publish(result)`. That only copies the changed rows into a
bounded, coalescing buffer and wakes the publisher's event loop, so a slow or absent channel layer never slows
ingestion. The loop (one per process, long-lived) flushes the buffer at most every `interval` seconds: a burst
of changes to one conversation becomes one snapshot (its newest state) per flush, so a browser receives at most
1 / interval updates per second per conversation. When the buffer is full the oldest conversation is dropped;
pages heal because they reload their state over HTTP on every (re)connect and every minute.

Groups: `live.all` (every conversation), `live.queue.<queue id>`, `live.conversation.<conversation id>`, and
`live.stats` (events committed per flush, for the events-per-second counter).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer
from redis.exceptions import RedisError

from conversations.models import Conversation
from conversations.services import BatchResult

logger = logging.getLogger(__name__)

ALL_GROUP = "live.all"
STATS_GROUP = "live.stats"
FLUSH_INTERVAL = 0.25  # seconds: at most 4 updates per second per conversation reach a browser
MAX_PENDING = 5000  # conversations waiting for the next flush
MESSAGE_SIZE = 200  # snapshots per channel-layer message
REMEMBERED_QUEUES = 50_000  # conversations whose last published queue is kept, to tell a queue it lost one
TRANSIENT_ERRORS = (OSError, asyncio.TimeoutError, RedisError)

_GROUP_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,60}$")

Snapshot = dict[str, Any]


def queue_group(queue_id: str) -> str:
    return f"live.queue.{_group_key(queue_id)}"


def conversation_group(conversation_id: str) -> str:
    return f"live.conversation.{_group_key(conversation_id)}"


def _group_key(value: str) -> str:
    """Group names allow only ASCII letters, digits, '-', '_' and '.', under 100 characters."""
    if _GROUP_SAFE.match(value):
        return value
    return "h" + hashlib.sha256(value.encode()).hexdigest()[:40]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def snapshot(conversation: Conversation) -> Snapshot:
    """What the live pages show of one conversation; also what the HTTP state endpoint returns."""
    since = {"ended": conversation.ended_at, "wrapped_up": conversation.wrapped_up_at}.get(conversation.state)
    return {
        "conversation_id": conversation.conversation_id,
        "state": conversation.state,
        "media_type": conversation.media_type,
        "direction": conversation.direction,
        "queue_id": conversation.queue_id,
        "queue_name": conversation.queue_name,
        "agent_id": conversation.agent_id,
        "agent_name": conversation.agent_name,
        "started_at": _iso(conversation.started_at),
        "ended_at": _iso(conversation.ended_at),
        "wrapped_up_at": _iso(conversation.wrapped_up_at),
        "last_event_at": _iso(conversation.last_event_at),
        "state_since": _iso(since or conversation.started_at),
        # Rows only get newer: a page keeps whichever copy of a conversation has the latest updated_at.
        "updated_at": _iso(conversation.updated_at),
    }


@dataclass
class Pending:
    snapshots: list[Snapshot] = field(default_factory=list)
    events: int = 0
    dropped: int = 0


class Coalescer:
    """Thread-safe buffer of the newest snapshot per conversation, bounded: when full, the oldest goes."""

    def __init__(self, capacity: int = MAX_PENDING) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._events = 0
        self._dropped = 0

    def put(self, snapshots: Iterable[Snapshot], *, events: int = 0) -> bool:
        """Add snapshots (a newer one replaces the pending one); True when the buffer was empty before."""
        with self._lock:
            was_empty = not self._snapshots and not self._events
            for item in snapshots:
                key = item["conversation_id"]
                self._snapshots.pop(key, None)
                self._snapshots[key] = item
                if len(self._snapshots) > self.capacity:
                    self._snapshots.popitem(last=False)
                    self._dropped += 1
            self._events += events
            return was_empty

    def take(self) -> Pending:
        with self._lock:
            pending = Pending(list(self._snapshots.values()), self._events, self._dropped)
            self._snapshots.clear()
            self._events = self._dropped = 0
            return pending


class Publisher:
    """Sends coalesced snapshots to the channel layer from one event loop; fed from any thread."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        layer: BaseChannelLayer | None = None,
        interval: float = FLUSH_INTERVAL,
        capacity: int = MAX_PENDING,
    ) -> None:
        self.loop = loop
        self.layer = layer or get_channel_layer()
        self.interval = interval
        self.buffer = Coalescer(capacity)
        self.flushes = 0
        self._wakeup = asyncio.Event()
        self._queues: OrderedDict[str, str] = OrderedDict()  # conversation -> queue last published
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        loop.call_soon_threadsafe(self._start)

    @classmethod
    def in_thread(cls, **kwargs: Any) -> Publisher:
        """A publisher with its own event loop in a daemon thread (the worker process's)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="live-publisher", daemon=True)
        thread.start()
        publisher = cls(loop=loop, **kwargs)
        publisher._thread = thread
        return publisher

    # -- any thread ------------------------------------------------------------------------------------
    def publish(self, result: BatchResult) -> None:
        """The after-commit listener: called in the writer thread with each committed batch; never blocks."""
        self.publish_snapshots([snapshot(row) for row in result.conversations.values()],
                               events=len(result.new_events))

    def publish_snapshots(self, snapshots: list[Snapshot], *, events: int = 0) -> None:
        if not snapshots and not events:
            return
        if self.buffer.put(snapshots, events=events):
            self.loop.call_soon_threadsafe(self._wakeup.set)

    def close(self, *, timeout: float = 5.0) -> None:
        """From another thread than the loop's: flush what is pending; stop the loop if this publisher owns it."""
        if self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.aclose(), self.loop)
            future.result(timeout)
        elif not self.loop.is_closed():  # a server's loop that has stopped: finish the flushing task on it
            self.loop.run_until_complete(self.aclose())
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)

    # -- the loop --------------------------------------------------------------------------------------
    def _start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def aclose(self) -> None:
        """On the loop: stop flushing on a timer, send what is pending."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def _run(self) -> None:
        last = 0.0
        while True:
            await self._wakeup.wait()
            # Changes that arrive while we wait for the interval to pass coalesce into this flush.
            await asyncio.sleep(max(0.0, last + self.interval - self.loop.time()))
            self._wakeup.clear()
            last = self.loop.time()
            await self.flush()

    async def flush(self) -> None:
        pending = self.buffer.take()
        if pending.dropped:
            logger.warning("live publisher fell behind: %d conversation snapshots dropped", pending.dropped)
        if not pending.snapshots and not pending.events:
            return
        messages = list(self._messages(pending))
        try:
            for group, message in messages:
                await self.layer.group_send(group, message)
        except TRANSIENT_ERRORS as exc:
            # Transient (Redis restarting, network): these updates are lost, pages resync over HTTP.
            logger.warning("live publish failed (%s: %s); %d snapshots not sent", type(exc).__name__, exc,
                           len(pending.snapshots))
            return
        except Exception:
            logger.exception("live publish failed unexpectedly; %d snapshots not sent", len(pending.snapshots))
            return
        self.flushes += 1
        logger.debug("live publisher sent %d snapshots, %d events in %d messages",
                     len(pending.snapshots), pending.events, len(messages))

    def _messages(self, pending: Pending) -> Iterator[tuple[str, dict[str, Any]]]:
        by_group: dict[str, list[Snapshot]] = {}
        for item in pending.snapshots:
            for group in self._groups_of(item):
                by_group.setdefault(group, []).append(item)
        for group, items in by_group.items():
            for start in range(0, len(items), MESSAGE_SIZE):
                yield group, {"type": "live.conversations", "conversations": items[start:start + MESSAGE_SIZE]}
        yield STATS_GROUP, {"type": "live.stats", "events": pending.events, "at": time.time()}

    def _groups_of(self, item: Snapshot) -> list[str]:
        """All, its queue, its conversation; and the queue it just left, so that queue's page drops it."""
        cid, queue = item["conversation_id"], item["queue_id"]
        groups = [ALL_GROUP, conversation_group(cid)]
        previous = self._queues.pop(cid, None)
        if previous and previous != queue:
            groups.append(queue_group(previous))
        if queue:
            groups.append(queue_group(queue))
            if item["state"] != "wrapped_up":
                self._queues[cid] = queue
                if len(self._queues) > REMEMBERED_QUEUES:
                    self._queues.popitem(last=False)
        return groups


# -- one publisher per process -------------------------------------------------------------------------
_installed: Publisher | None = None
_install_lock = threading.Lock()


def install_publisher(*, loop: asyncio.AbstractEventLoop) -> Publisher:
    """Publish from `loop`: the web server's own loop when the worker runs inside the server's process
    (`manage.py demo`), which the in-memory channel layer needs (its queues belong to one loop)."""
    global _installed
    with _install_lock:
        if _installed is not None:
            raise RuntimeError("a live publisher is already installed in this process")
        _installed = Publisher(loop=loop)
        return _installed


def after_commit_listener() -> Callable[[BatchResult], None] | None:
    """The worker's listener, or None when no page can hear it (in-memory layer, no server in-process)."""
    global _installed
    with _install_lock:
        if _installed is None:
            layer = get_channel_layer()
            if layer is None or isinstance(layer, InMemoryChannelLayer):
                logger.info("live updates off in this worker: the in-memory channel layer reaches only its own "
                            "process; set REDIS_URL (or run `manage.py demo`) for live pages")
                return None
            _installed = Publisher.in_thread()
        return _installed.publish


def shutdown_publisher() -> None:
    """Flush and forget the process's publisher (end of the demo, end of a test)."""
    global _installed
    with _install_lock:
        publisher, _installed = _installed, None
    if publisher is not None:
        publisher.close()
