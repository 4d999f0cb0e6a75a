"""The stream worker's heartbeat: a WorkerHeartbeat row per worker process, upserted every few seconds, and
the reads that /readyz, /metrics and `stream_status` make of it.

"Alive" means: the worker still writes its row, and either its stream is connected (a silent connection is
dropped after SSE_READ_TIMEOUT, so "connected" stays honest) or an event arrived recently.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from django.conf import settings
from django.db import DatabaseError, connection

from conversations import metrics
from conversations.models import WorkerHeartbeat
from conversations.services import BatchResult

logger = logging.getLogger(__name__)

# How many of the most recent heartbeats /readyz looks at to find a live worker (one row per worker process).
RECENT_WORKERS = 50


class SourceStats(Protocol):
    """What the heartbeat reads of a source's stats (conversations.genesys.sse.SourceStats)."""

    reconnects: int
    messages: int
    last_connected_at: datetime | None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Beat:
    connected: bool
    last_event_at: datetime | None
    events_committed: int
    reconnects: int


class SourceWatch:
    """Turns a source's counters, sampled once per beat, into "connected" and "last message at".

    A connection counts as up from the beat that first sees its `last_connected_at` until a reconnect is
    counted after it. A drop and a reconnect within one beat read as still connected, which is what they are
    by the next beat; a connect followed by a drop within one beat reads as connected until the next attempt.
    """

    def __init__(self) -> None:
        self._connect_seen: datetime | None = None
        self._reconnects_at_connect = 0
        self._reconnects_seen = 0
        self._messages_seen = 0
        self.last_message_at: datetime | None = None

    def sample(self, stats: SourceStats, moment: datetime) -> tuple[bool, int]:
        """(connected, reconnects counted since the previous sample)."""
        if stats.messages != self._messages_seen:
            self._messages_seen = stats.messages
            self.last_message_at = moment
        if stats.last_connected_at is not None and stats.last_connected_at != self._connect_seen:
            self._connect_seen = stats.last_connected_at
            self._reconnects_at_connect = stats.reconnects
        new_reconnects = stats.reconnects - self._reconnects_seen
        self._reconnects_seen = stats.reconnects
        connected = self._connect_seen is not None and stats.reconnects == self._reconnects_at_connect
        return connected, new_reconnects


class Heartbeat:
    """Owned by one Worker: `record_batch` is its after-commit listener, `running()` beats in a thread."""

    def __init__(
        self,
        *,
        source_name: str,
        stats: SourceStats | None = None,
        interval: float | None = None,
        worker: str | None = None,
    ) -> None:
        self.worker = worker or worker_id()
        self.source_name = source_name
        self.stats = stats
        self.interval = settings.HEARTBEAT_INTERVAL if interval is None else interval
        self.started_at = now()
        self._watch = SourceWatch()
        self._lock = threading.Lock()
        self._committed = 0
        self._reconnects = 0
        self._last_batch_at: datetime | None = None
        self._stop = threading.Event()

    def record_batch(self, result: BatchResult) -> None:
        """After-commit listener, called in the writer thread."""
        with self._lock:
            self._committed += result.size
            self._last_batch_at = now()

    @contextmanager
    def running(self) -> Iterator[Heartbeat]:
        """Beat now and every `interval` seconds; on exit, a last beat that says "disconnected"."""
        self.beat()
        thread = threading.Thread(target=self._loop, name=f"{self.source_name}-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=max(self.interval, 1.0) + 5.0)
            self.beat(final=True)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.beat()
        finally:
            connection.close()  # this thread's own connection

    def beat(self, *, final: bool = False) -> bool:
        """Upsert the row; a database hiccup is transient: logged, and the next beat tries again."""
        beat = self.sample(final=final)
        try:
            write_heartbeat(
                worker=self.worker, source=self.source_name, started_at=self.started_at, beat=beat
            )
        except DatabaseError as exc:
            logger.warning(
                "heartbeat of worker %s (%s) not written: %s; next try in %.0fs",
                self.worker,
                self.source_name,
                exc,
                self.interval,
            )
            connection.close()
            return False
        return True

    def sample(self, *, final: bool = False) -> Beat:
        moment = now()
        connected, new_reconnects = (False, 0)
        if self.stats is not None:
            connected, new_reconnects = self._watch.sample(self.stats, moment)
        metrics.record_source(
            source=self.source_name, connected=connected and not final, new_reconnects=new_reconnects
        )
        with self._lock:
            self._reconnects += new_reconnects
            times = [t for t in (self._watch.last_message_at, self._last_batch_at) if t is not None]
            return Beat(
                connected=connected and not final,
                last_event_at=max(times, default=None),
                events_committed=self._committed,
                reconnects=self._reconnects,
            )


def write_heartbeat(*, worker: str, source: str, started_at: datetime, beat: Beat) -> None:
    fields = {
        "source": source,
        "started_at": started_at,
        "beat_at": now(),
        "last_event_at": beat.last_event_at,
        "connected": beat.connected,
        "events_committed": beat.events_committed,
        "reconnects": beat.reconnects,
    }
    # One writer per worker id, so update-then-create cannot race with itself.
    if not WorkerHeartbeat.objects.filter(worker=worker).update(**fields):
        WorkerHeartbeat.objects.create(worker=worker, **fields)


# -- reads -------------------------------------------------------------------------------------------


def alive_at(heartbeat: WorkerHeartbeat) -> datetime | None:
    """The last moment the worker's stream was known to be alive."""
    times = [heartbeat.last_event_at] if heartbeat.last_event_at else []
    if heartbeat.connected:
        times.append(heartbeat.beat_at)
    return max(times, default=None)


def seconds_since(moment: datetime | None, *, at: datetime) -> float | None:
    return None if moment is None else max((at - moment).total_seconds(), 0.0)


@dataclass(frozen=True)
class Freshness:
    heartbeat: WorkerHeartbeat | None  # the worker whose stream was alive most recently
    age: float | None  # seconds since then; None when no worker has ever been alive
    threshold: float

    @property
    def stale(self) -> bool:
        if self.threshold <= 0:
            return False
        return self.age is None or self.age > self.threshold

    def reason(self) -> str:
        if self.heartbeat is None:
            return "no stream worker has written a heartbeat"
        worker = f"worker {self.heartbeat.worker} ({self.heartbeat.source})"
        if self.age is None:
            return f"{worker} has not connected to the stream yet"
        state = "connected" if self.heartbeat.connected else "disconnected"
        return f"{worker} last alive {self.age:.0f}s ago ({state}); threshold {self.threshold:.0f}s"


def recent_heartbeats(*, host: str | None = None, limit: int = RECENT_WORKERS) -> list[WorkerHeartbeat]:
    rows = WorkerHeartbeat.objects.order_by("-beat_at")
    if host:
        rows = rows.filter(worker__startswith=f"{host}:")
    return list(rows[:limit])


def stream_freshness(
    *,
    heartbeats: list[WorkerHeartbeat] | None = None,
    at: datetime | None = None,
    threshold: float | None = None,
) -> Freshness:
    """The freshest stream among the workers that beat most recently (any one alive worker is enough)."""
    rows = recent_heartbeats() if heartbeats is None else heartbeats
    at = at or now()
    threshold = settings.STREAM_STALE_SECONDS if threshold is None else threshold
    if not rows:
        return Freshness(heartbeat=None, age=None, threshold=threshold)
    best = max(rows, key=lambda row: (alive_at(row) or datetime.min.replace(tzinfo=UTC), row.beat_at))
    return Freshness(heartbeat=best, age=seconds_since(alive_at(best), at=at), threshold=threshold)
