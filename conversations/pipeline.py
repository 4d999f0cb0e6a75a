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
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, transaction
from django.db import connection as db_connection

from conversations import metrics, services
from conversations.events import Reject, TypedEvent
from conversations.genesys.backoff import Backoff

logger = logging.getLogger(__name__)

Item = TypedEvent | Reject
T = TypeVar("T")
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
        fold_ahead: bool = False,
    ) -> None:
        self.source_name = source_name
        # Worker-level listeners (live broadcast, metrics) called with each committed batch, in this thread.
        self.after_commit = list(after_commit)
        # Runs inside every batch transaction (the consumer lease's fence): raising rolls the batch back.
        self.guard = guard
        # Fold the next batch while the database stores this one (PostgreSQL; see FoldAhead).
        self.fold_ahead = fold_ahead
        self.batch_size = batch_size
        self.max_age = max_age
        self.queue: queue.Queue[Envelope | SourceStopped] = queue.Queue(maxsize=queue_size)
        self.totals = Totals()
        self.source_error: BaseException | None = None
        self.source_done = False
        self.last_commit = float("-inf")
        self.stop = threading.Event()
        self.stage: FoldAhead | None = None

    @classmethod
    def from_settings(
        cls, source_name: str, *, after_commit: Iterable[Callable[[services.BatchResult], None]] = (),
        guard: Callable[[], None] | None = None,
    ) -> Pipeline:
        """Sized and staged by the INGEST_* settings, as the worker (and the benchmark, which must match it) runs."""
        return cls(source_name=source_name, batch_size=settings.INGEST_BATCH_SIZE,
                   max_age=settings.INGEST_BATCH_MAX_AGE, queue_size=settings.INGEST_QUEUE_SIZE,
                   fold_ahead=settings.INGEST_FOLD_AHEAD, after_commit=after_commit, guard=guard)

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
        if self.fold_ahead and db_connection.vendor == "postgresql" and not db_connection.in_atomic_block:
            self.stage = FoldAhead(self)
            return self.stage.run(stop=stop, max_events=max_events)
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
        self._reconnect_if_idle()
        events, rejects, cursor = split(batch)
        started = time.monotonic()
        result = self.write(events=events, rejects=rejects, cursor=cursor)
        self._committed(result, cursor=cursor, started=started)
        return result

    def _reconnect_if_idle(self) -> None:
        if time.monotonic() - self.last_commit > IDLE_RECONNECT_SECONDS:
            close_old_connections()  # after idle time the server may have dropped us; a busy stream keeps it

    def _committed(self, result: services.BatchResult, *, cursor: str | None, started: float) -> None:
        self.last_commit = time.monotonic()
        metrics.observe_commit(source=self.source_name, seconds=time.monotonic() - started)
        self._count(result, cursor=cursor, seconds=time.monotonic() - started)
        for listener in self.after_commit:
            listener(result)

    def write(self, *, events: list[TypedEvent], rejects: list[Reject], cursor: str | None) -> services.BatchResult:
        """Commit the batch, holding it through a database outage: the reader meanwhile fills the bounded queue
        and then waits (backpressure), so nothing is dropped and the checkpoint never passes what was written."""
        return self.retrying(
            lambda: services.ingest_batch(
                events=events, rejects=rejects, source=self.source_name, last_event_id=cursor, guard=self.guard
            ),
            held=len(events) + len(rejects),
        )

    def retrying(self, attempt: Callable[[], T], *, held: int) -> T:
        """Run `attempt` until the database answers (see write)."""
        backoff = Backoff(base=0.5, cap=DB_RETRY_CAP)
        while True:
            try:
                return attempt()
            except (OperationalError, InterfaceError) as exc:
                self._database_down(exc, held=held, delay=backoff.next_delay(), attempt=backoff.attempts)

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


def split(batch: list[Envelope]) -> tuple[list[TypedEvent], list[Reject], str | None]:
    """A batch's events, its rejects, and the cursor to checkpoint once it is committed."""
    events = [e.item for e in batch if isinstance(e.item, TypedEvent)]
    rejects = [e.item for e in batch if isinstance(e.item, Reject)]
    return events, rejects, next((e.cursor for e in reversed(batch) if e.cursor), None)


@dataclass
class Folded:
    batch: services.FoldedBatch
    epoch: int
    cursor: str | None
    raw: tuple[list[TypedEvent], list[Reject]]


class FoldAhead:
    """The writer in two stages, so Python and PostgreSQL work at the same time (one core each): this thread
    folds batch N+1 while a storing thread has the database write batch N.

    The fold of N+1 starts from the state of N's conversations as folded (a cache holding exactly the
    conversations of batches folded but not yet committed) and reads every other conversation from the
    database, where it is committed. That is only right if nobody else wrote in between: every writer holds
    the writer lock and draws a number from one sequence (services.hold_writer_lock), so the storing thread
    sees another writer (a backfill, a reprocess) as a gap in its numbers. It then folds that batch again
    under the lock from what is stored, and so does it for every batch folded on the stale cache (an epoch
    number marks them), and the folding side empties the cache once those are through. A failed attempt is
    retried as folded: it stored nothing, and the next number shows whether anybody else did meanwhile (a
    commit in doubt is the exception: README, "Guarantees")."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.cache = services.FoldCache()
        self.epoch = 0  # the storing thread's; a batch folded under an older one is folded again
        self.generation: int | None = None  # the last number the storing thread drew
        self.fresh = self.refolds = 0  # batches stored as folded ahead / folded again under the lock
        self.handoff: queue.Queue[Folded | None] = queue.Queue(maxsize=1)
        self.pending = 0  # batches handed over and not yet stored (or given up)
        self.done = threading.Condition()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._store_loop, name=f"{pipeline.source_name}-store", daemon=True)

    def run(self, *, stop: threading.Event, max_events: int | None) -> Totals:
        pipeline, submitted = self.pipeline, 0
        self.thread.start()
        try:
            while not stop.is_set() and not pipeline.source_done and self.error is None:
                if max_events is not None and submitted >= max_events:
                    break
                limit = pipeline.batch_size if max_events is None else min(pipeline.batch_size,
                                                                          max_events - submitted)
                batch = pipeline.collect(limit=limit)
                if batch:
                    self.submit(batch)
                    submitted += len(batch)
            if stop.is_set() and self.error is None:
                batch = pipeline.drain()
                if batch:
                    self.submit(batch)
        except BaseException:
            # The run is ending on an error of this side: the storing thread stores what it holds, but gives up
            # at once if the database is down (instead of holding the worker until it is back).
            stop.set()
            raise
        finally:
            self._hand(None)
            self.thread.join()
        if self.error is not None:
            raise self.error
        return pipeline.totals

    def submit(self, batch: list[Envelope]) -> None:
        events, rejects, cursor = split(batch)
        if self.cache.epoch != self.epoch:  # the storing thread found the cache stale
            self._wait_idle()
            self.cache.clear(epoch=self.epoch)
        self.pipeline._reconnect_if_idle()
        folded = self.pipeline.retrying(
            lambda: services.fold_batch(events=events, rejects=rejects, source=self.pipeline.source_name,
                                        last_event_id=cursor, load=self.cache.load),
            held=len(events) + len(rejects),
        )
        with self.done:
            self.pending += 1
        self._hand(Folded(folded, self.cache.epoch, cursor, (events, rejects)))

    def _hand(self, item: Folded | None) -> None:
        while self.thread.is_alive():
            try:
                self.handoff.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _wait_idle(self) -> None:
        with self.done:
            self.done.wait_for(lambda: self.pending == 0 or self.error is not None)

    # -- the storing thread ---------------------------------------------------------------------------
    def _store_loop(self) -> None:
        try:
            while (item := self.handoff.get()) is not None:
                try:
                    started = time.monotonic()
                    result = self.pipeline.retrying(lambda item=item: self._store(item),
                                                    held=item.batch.committed)
                    services.after_commit(result)
                    self.pipeline._committed(result, cursor=item.cursor, started=started)
                finally:
                    self.cache.release(item.batch.rows)
                    with self.done:
                        self.pending -= 1
                        self.done.notify_all()
        except BaseException as exc:  # raised again in the pipeline's thread, which ends the run
            with self.done:
                self.error = exc
                self.done.notify_all()
        finally:
            close_connection()

    def _store(self, item: Folded) -> services.BatchResult:
        with transaction.atomic():
            if self.pipeline.guard is not None:
                self.pipeline.guard()
            generation = services.hold_writer_lock()
            fresh = item.epoch == self.epoch and self.generation is not None and generation == self.generation + 1
            self.generation = generation
            if fresh:
                self.fresh += 1
                return services.store(item.batch)
            self.refolds += 1
            if item.epoch == self.epoch:
                self.epoch += 1
            events, rejects = item.raw
            logger.info("%s: folding a batch of %d again under the writer lock (another writer came between, "
                        "or the first batch)", self.pipeline.source_name, len(events) + len(rejects))
            return services.store(services.fold_batch(events=events, rejects=rejects,
                                                      source=self.pipeline.source_name, last_event_id=item.cursor,
                                                      load=services.read_state))


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
