"""The worker's road: a reader thread (source -> decoder -> normalizer) feeding a bounded queue, and a writer
that commits batches by size or age. A slow database fills the queue and so slows the reader: memory stays
bounded and nothing is dropped."""
from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.db import InterfaceError, OperationalError, close_old_connections
from django.db import connection as db_connection

from conversations import metrics, services
from conversations.events import Reject, TypedEvent
from conversations.genesys.backoff import Backoff

logger = logging.getLogger(__name__)

Item = TypedEvent | Reject
IDLE_RECONNECT_SECONDS = 5.0
DB_RETRY_CAP = 30.0


class DatabaseUnavailable(Exception):
    """The database stayed down until shutdown; what was held is re-read from the checkpoint on restart."""


def close_connection() -> None:
    try:
        db_connection.close()
    except (OperationalError, InterfaceError):
        pass  # already broken: Django drops it either way and reconnects on next use


@dataclass(frozen=True, slots=True)
class Envelope:
    """One normalized item and the resume cursor in effect when it was read."""

    item: Item
    cursor: str | None


@dataclass(frozen=True, slots=True)
class SourceStopped:
    """Put on the queue by the reader when the source ends; carries the error that ended it, if any."""

    error: BaseException | None = None


@dataclass
class Totals:
    new_events: int = 0
    duplicates: int = 0
    rejects: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def committed(self) -> int:
        return self.new_events + self.duplicates + self.rejects

    def rate(self) -> float:
        return self.committed / max(time.monotonic() - self.started, 1e-6)


class Pipeline:
    def __init__(
        self,
        *,
        source_name: str,
        batch_size: int = 500,
        max_age: float = 0.1,
        queue_size: int = 5000,
        after_commit: Iterable[Callable[[services.BatchResult], None]] = (),
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.source_name = source_name
        # Worker-level listeners (live broadcast, metrics) called with each committed batch, in this thread.
        self.after_commit = list(after_commit)
        # Runs inside every batch transaction (the consumer lease's fence): raising rolls the batch back.
        self.guard = guard
        self.batch_size = batch_size
        self.max_age = max_age
        self.queue: queue.Queue[Envelope | SourceStopped] = queue.Queue(maxsize=queue_size)
        self.totals = Totals()
        self.source_error: BaseException | None = None
        self.source_done = False
        self.last_commit = float("-inf")
        self.stop = threading.Event()

    # -- reader side ------------------------------------------------------------------------------
    def read(self, items: Iterable[Envelope]) -> None:
        """Run in the reader thread: put every normalized item on the bounded queue (blocks when full)."""
        error: BaseException | None = None
        try:
            for envelope in items:
                self.queue.put(envelope)
        except BaseException as exc:  # handed to the writer, which decides how the worker ends
            error = exc
        self.queue.put(SourceStopped(error))

    def start_reader(self, items: Iterable[Envelope]) -> threading.Thread:
        # A daemon: if it is blocked on the network at shutdown, what it holds was never committed and the
        # checkpoint still points before it.
        thread = threading.Thread(target=self.read, args=(items,), name=f"{self.source_name}-reader", daemon=True)
        thread.start()
        return thread

    # -- writer side ------------------------------------------------------------------------------
    def run(self, *, stop: threading.Event, max_events: int | None = None) -> Totals:
        """Commit batches until stopped, the source ends, or max_events are committed."""
        tune_garbage_collector()
        self.stop = stop
        while not stop.is_set() and not self.source_done:
            if max_events is not None and self.totals.committed >= max_events:
                break
            self.commit(self.collect(limit=self._limit(max_events)))
        if stop.is_set():
            self.commit(self.drain())
        return self.totals

    def _limit(self, max_events: int | None) -> int:
        if max_events is None:
            return self.batch_size
        return max(1, min(self.batch_size, max_events - self.totals.committed))

    def collect(self, *, limit: int, wait: float = 0.25) -> list[Envelope]:
        """The first item waits up to `wait`; the batch then fills until `limit` items or `max_age` seconds."""
        batch: list[Envelope] = []
        deadline = None
        while len(batch) < limit:
            timeout = wait if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                entry = self.queue.get(timeout=timeout)
            except queue.Empty:
                break
            if isinstance(entry, SourceStopped):
                self._source_stopped(entry)
                break
            batch.append(entry)
            deadline = deadline or time.monotonic() + self.max_age
        return batch

    def drain(self) -> list[Envelope]:
        """At shutdown: everything already read is committed before the worker exits."""
        batch: list[Envelope] = []
        while True:
            try:
                entry = self.queue.get_nowait()
            except queue.Empty:
                return batch
            if isinstance(entry, SourceStopped):
                self._source_stopped(entry)
            else:
                batch.append(entry)

    def _source_stopped(self, entry: SourceStopped) -> None:
        self.source_done = True
        self.source_error = entry.error

    def commit(self, batch: list[Envelope]) -> services.BatchResult | None:
        if not batch:
            return None
        if time.monotonic() - self.last_commit > IDLE_RECONNECT_SECONDS:
            close_old_connections()  # after idle time the server may have dropped us; a busy stream keeps it
        events = [e.item for e in batch if isinstance(e.item, TypedEvent)]
        rejects = [e.item for e in batch if isinstance(e.item, Reject)]
        cursor = next((e.cursor for e in reversed(batch) if e.cursor), None)
        started = time.monotonic()
        result = self.write(events=events, rejects=rejects, cursor=cursor)
        self.last_commit = time.monotonic()
        metrics.observe_commit(source=self.source_name, seconds=time.monotonic() - started)
        self._count(result, cursor=cursor, seconds=time.monotonic() - started)
        for listener in self.after_commit:
            listener(result)
        return result

    def write(self, *, events: list[TypedEvent], rejects: list[Reject], cursor: str | None) -> services.BatchResult:
        """Commit the batch, holding it through a database outage: the reader meanwhile fills the bounded queue
        and then waits (backpressure), so nothing is dropped and the checkpoint never passes what was written."""
        backoff = Backoff(base=0.5, cap=DB_RETRY_CAP)
        while True:
            try:
                return services.ingest_batch(
                    events=events, rejects=rejects, source=self.source_name, last_event_id=cursor, guard=self.guard
                )
            except (OperationalError, InterfaceError) as exc:
                self._database_down(exc, held=len(events) + len(rejects), delay=backoff.next_delay(),
                                    attempt=backoff.attempts)

    def _database_down(self, exc: Exception, *, held: int, delay: float, attempt: int) -> None:
        close_connection()  # the next attempt opens a fresh one
        if self.stop.is_set():
            raise DatabaseUnavailable(
                f"the database is unavailable at shutdown: {held} events were not committed and the "
                "checkpoint was not moved, so they are read again on restart"
            ) from exc
        logger.warning("%s: database unavailable (%s); holding %d events (%d queued), retry %d in %.1fs",
                       self.source_name, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                       held, self.queue.qsize(), attempt, delay)
        self.stop.wait(delay)

    def _count(self, result: services.BatchResult, *, cursor: str | None, seconds: float) -> None:
        totals = self.totals
        totals.batches += 1
        totals.new_events += len(result.new_events)
        totals.duplicates += result.duplicates
        totals.rejects += len(result.rejects)
        ended = sum(1 for t in result.transitions if t.new_state == "ended")
        wrapped = sum(1 for t in result.transitions if t.new_state == "wrapped_up")
        logger.info(
            "%s batch %d committed in %.0f ms: %d new, %d duplicate, %d rejected; %d conversations "
            "(%d ended, %d wrapped up); checkpoint %s; %d committed so far, %.1f/s",
            self.source_name, totals.batches, seconds * 1000, len(result.new_events), result.duplicates,
            len(result.rejects), len(result.conversations), ended, wrapped, cursor or "-", totals.committed,
            totals.rate(),
        )


_gc_tuned = False
# Young objects collected every this many allocations (Python's default is 700), older generations as usual.
GC_THRESHOLDS = (10_000, 20, 20)


def tune_garbage_collector() -> None:
    """Once per process. Ingest makes many short-lived objects (decoded payloads, typed events, rows); with the
    default thresholds the cyclic collector also walks every long-lived object (Django, the app) again and
    again, which cost about a third of the worker's CPU. What exists when the worker starts is frozen out of
    its reach (still freed when unreferenced), and young collections run less often."""
    global _gc_tuned
    if _gc_tuned:
        return
    _gc_tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def normalized(messages: Iterable, normalize: Callable[..., Item | None]) -> Iterable[Envelope]:
    """Decoded SSE messages -> envelopes; keep-alives vanish here."""
    for message in messages:
        item = normalize(message.data, sse_id=message.id)
        if item is not None:
            yield Envelope(item, message.id)
