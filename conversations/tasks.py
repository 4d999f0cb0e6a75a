"""Where hook deliveries run: as Celery tasks on workers, or, with no broker, on the in-process runner of the
ingest worker. Both are thin: they take ids and call the outbox. Idempotent: a delivery run twice claims nothing.
"""
from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from conversations import outbox

logger = logging.getLogger(__name__)

# How often an idle runner thread looks up from its queue (to notice a stop) and the clock thread ticks.
TICK_SECONDS = 0.2


@shared_task(
    name="conversations.deliver_hook",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    soft_time_limit=settings.HOOK_TASK_SOFT_TIME_LIMIT,
    time_limit=settings.HOOK_TASK_TIME_LIMIT,
)
def deliver_hook(delivery_id: int) -> str:
    """Run one hook delivery by id: claim it, call the hook, record the outcome (a retry sends itself)."""
    return outbox.run_delivery(delivery_id)


@shared_task(name="conversations.deliver_hooks", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_hooks(delivery_ids: list[int]) -> int:
    """One committed batch's deliveries, sent by the ingest worker as one message: fanned out here into one
    deliver_hook task per id (sending twice is harmless: each delivery is claimed once)."""
    return outbox.fan_out(delivery_ids)


@shared_task(name="conversations.sweep_hook_deliveries", ignore_result=True, time_limit=120)
def sweep_hook_deliveries() -> dict[str, int]:
    """Run by celery beat every HOOK_SWEEP_INTERVAL seconds."""
    result = outbox.sweep()
    return {"resent": result.resent, "released": result.released, "abandoned_failed": result.abandoned_failed}


# -- without a broker: the ingest worker's in-process runner -------------------------------------------


class InProcessRunner:
    """Hook deliveries of an ingest worker that has no broker (the demo, the SQLite tests), off its commit path:
    a few threads fed by a bounded queue of delivery ids, and a clock thread that hands over retries when they
    are due and sweeps every HOOK_SWEEP_INTERVAL seconds (no celery beat runs without a broker).

    Handing it ids never waits: what does not fit in the queue stays pending in the outbox, and the sweeper
    sends it once there is room. A thread runs a delivery with outbox.run_delivery, whose claim (a conditional
    UPDATE) lets only one attempt run however often an id is handed over. stop() takes no more work, gives
    running hooks a bounded grace, and leaves whatever it still holds pending in the outbox."""

    def __init__(self, *, threads: int, queue_size: int, sweep_interval: float) -> None:
        self.queue: queue.Queue[int] = queue.Queue(maxsize=queue_size)
        self.retries: list[tuple[float, int]] = []  # a heap of (monotonic time due, delivery id)
        self.retries_lock = threading.Lock()
        self.sweep_interval = sweep_interval
        self.closing = threading.Event()
        # Daemons: a hook still running when the grace is over must not keep the process from exiting.
        self.workers = [threading.Thread(target=self._work, name=f"hooks-{n + 1}", daemon=True)
                        for n in range(threads)]
        self.clock = threading.Thread(target=self._keep_time, name="hooks-clock", daemon=True)

    @classmethod
    def from_settings(cls) -> InProcessRunner:
        return cls(threads=settings.HOOK_INPROCESS_THREADS, queue_size=settings.HOOK_INPROCESS_QUEUE_SIZE,
                   sweep_interval=settings.HOOK_SWEEP_INTERVAL)

    @property
    def capacity(self) -> int:
        return self.queue.maxsize

    def start(self) -> None:
        for thread in [*self.workers, self.clock]:
            thread.start()
        logger.info("post-call hooks: running in this process on %d threads, off the commit path (queue of %d "
                    "deliveries; the rest wait in the outbox for the sweeper, every %.0f s)",
                    len(self.workers), self.capacity, self.sweep_interval)

    def submit(self, delivery_ids: Sequence[int]) -> list[int]:
        """Queue the ids without waiting; returns those taken. The rest stay pending for the sweeper."""
        taken: list[int] = []
        for pk in delivery_ids:
            if self.closing.is_set():
                break
            try:
                self.queue.put_nowait(pk)
            except queue.Full:
                break
            taken.append(pk)
        if len(taken) < len(delivery_ids):
            logger.info("post-call hooks: in-process queue %s, %d of %d hook deliveries left pending in the "
                        "outbox for the sweeper", "stopped" if self.closing.is_set() else "full",
                        len(delivery_ids) - len(taken), len(delivery_ids))
        return taken

    def retry_at(self, delivery_id: int, *, at: datetime) -> None:
        """Hand the delivery over again when its retry is due; with too many waiting, the sweeper sends it."""
        due = time.monotonic() + max((at - timezone.now()).total_seconds(), 0.0)
        with self.retries_lock:
            if self.closing.is_set() or len(self.retries) >= self.capacity:
                return
            heapq.heappush(self.retries, (due, delivery_id))

    def stop(self, *, grace: float) -> None:
        """Take no more work; give hooks already running up to `grace` seconds to finish. What is still queued
        or waiting for its retry stays pending in the outbox, for the sweeper of the next start."""
        self.closing.set()
        deadline = time.monotonic() + grace
        threads = [*self.workers, self.clock]
        for thread in threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        still_running = [thread.name for thread in threads if thread.is_alive()]
        logger.info("post-call hooks: in-process runner stopped; %d queued and %d waiting retries left pending "
                    "for the next start%s", self.queue.qsize(), len(self.retries),
                    f"; still running after {grace:.0f} s: {', '.join(still_running)} (their claims expire "
                    "after HOOK_CLAIM_TIMEOUT)" if still_running else "")

    # -- the threads ----------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self.closing.is_set():
                try:
                    pk = self.queue.get(timeout=TICK_SECONDS)
                except queue.Empty:
                    continue
                if not self.closing.is_set():  # taken just as the runner stopped: it stays pending
                    self._deliver(pk)
        finally:
            connection.close()  # this thread's own

    def _deliver(self, delivery_id: int) -> None:
        close_old_connections()  # one the database dropped while this thread was idle is replaced
        try:
            outbox.run_delivery(delivery_id)
        except DatabaseError as exc:
            # Not claimed: pending, the sweeper re-sends it. Claimed: the claim expires and the sweeper releases it.
            logger.warning("hook delivery %s: database error (%s); left to the sweeper", delivery_id,
                           first_line(exc))
        except Exception:  # a bug must not take a thread from the pool; the delivery is left as above
            logger.exception("hook delivery %s: unexpected error in the in-process runner", delivery_id)
        finally:
            close_old_connections()

    def _keep_time(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval
        try:
            while not self.closing.wait(TICK_SECONDS):
                self.submit(self._due_retries())
                if time.monotonic() >= next_sweep:
                    more = self._sweep()
                    next_sweep = time.monotonic() + (TICK_SECONDS if more else self.sweep_interval)
        finally:
            connection.close()  # this thread's own

    def _due_retries(self) -> list[int]:
        now, due = time.monotonic(), []
        with self.retries_lock:
            while self.retries and self.retries[0][0] <= now:
                due.append(heapq.heappop(self.retries)[1])
        return due

    def _sweep(self) -> bool:
        """Sweep as many as the queue has room for; returns whether more may be due (sweep again soon)."""
        limit = min(self.capacity - self.queue.qsize(), settings.HOOK_SWEEP_BATCH)
        if limit < min(self.capacity, settings.HOOK_SWEEP_BATCH) / 2:
            return True  # busy: rows claimed now would wait in the queue, or not fit
        close_old_connections()
        try:
            return outbox.sweep(limit=limit).resent >= limit
        except DatabaseError as exc:
            logger.warning("sweeper: database error (%s); trying again in %.0f s", first_line(exc),
                           self.sweep_interval)
            return False
        finally:
            close_old_connections()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_runner: InProcessRunner | None = None


def current_runner() -> InProcessRunner | None:
    """The runner this process's hook deliveries go to, if one runs (see in_process_hooks); else Celery."""
    return _runner


@contextmanager
def in_process_hooks() -> Iterator[InProcessRunner | None]:
    """Around an ingest worker's run: with no broker, its hook deliveries run on an InProcessRunner for the
    block, stopped at its end within HOOK_INPROCESS_SHUTDOWN_GRACE seconds. With a broker, Celery workers run
    them and this does nothing."""
    global _runner
    from monitor_project.celery import app

    if not app.conf.task_always_eager:
        yield None
        return
    runner, previous = InProcessRunner.from_settings(), _runner
    runner.start()
    _runner = runner
    try:
        yield runner
    finally:
        # Uninstalled only once stopped: until then a delivery finishing its attempt hands its retry to the
        # closed runner (left pending) rather than to Celery, which would run it at once in this thread.
        runner.stop(grace=settings.HOOK_INPROCESS_SHUTDOWN_GRACE)
        _runner = previous
