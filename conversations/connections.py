"""Connection history: one StreamConnection row per SSE stream or Notifications socket.

Sources know no database: they report each connection's life (connected, heartbeats and events, disconnected)
to a callback. The worker's callback is a ConnectionRecorder: it keeps only the newest report per connection
(the source never waits for the database) and a thread of its own upserts them. The rows tell the product where
its gaps are: between one row's `disconnected_at` and the next row's `connected_at`, events may have been lost.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connection
from django.utils import timezone

from conversations.genesys.notifications import ConnectionReport
from conversations.models import StreamConnection

logger = logging.getLogger(__name__)

# How often the recorder thread writes what was reported (the newest report per connection wins).
FLUSH_INTERVAL = 0.5


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def record_connection(*, report: ConnectionReport, worker: str) -> StreamConnection:
    """Upsert the connection's row from a report; a report is the whole truth about its connection so far."""
    fields = {
        "source": report.source,
        "worker": worker,
        "channel_id": report.channel_id,
        "connected_at": report.connected_at,
        "last_heartbeat_at": report.last_heartbeat_at,
        "last_event_at": report.last_event_at,
        "events_received": report.events_received,
        "disconnected_at": report.disconnected_at,
        "disconnect_reason": report.disconnect_reason,
    }
    # One recorder per worker writes a connection's rows, so update-then-create cannot race with itself.
    if StreamConnection.objects.filter(connection_id=report.connection_id).update(**fields):
        return StreamConnection(connection_id=report.connection_id, **fields)
    return StreamConnection.objects.create(connection_id=report.connection_id, **fields)


def close_open_connections(*, worker: str, reason: str) -> int:
    """Mark this worker's connections that are still open as closed (at shutdown, after the last report)."""
    return StreamConnection.objects.filter(worker=worker, disconnected_at__isnull=True).update(
        disconnected_at=timezone.now(), disconnect_reason=reason
    )


class ConnectionRecorder:
    """The connection-history callback of one worker: `recorder(report)` from any thread, written in its own."""

    def __init__(self, *, worker: str | None = None, flush_interval: float = FLUSH_INTERVAL) -> None:
        self.worker = worker or worker_name()
        self.flush_interval = flush_interval
        self.written = 0
        self._pending: dict[str, ConnectionReport] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, report: ConnectionReport) -> None:
        with self._lock:
            self._pending[report.connection_id] = report
        if report.disconnected_at is not None:
            self._wake.set()  # a disconnect is worth writing now: it opens a gap

    @contextmanager
    def running(self) -> Iterator[ConnectionRecorder]:
        """Write in a thread while the block runs; on exit, write what is left and close stray rows."""
        self._thread = threading.Thread(target=self._loop, name="connection-history", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=10)

    def flush(self) -> int:
        """Write every pending report; a database failure keeps the unwritten ones for the next try."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for index, report in enumerate(pending):
            try:
                record_connection(report=report, worker=self.worker)
            except DatabaseError as exc:
                logger.warning("connection history: %d reports not written (%s); retrying in %.1fs",
                               len(pending) - index, exc, self.flush_interval)
                for unwritten in pending[index:]:
                    self._keep(unwritten)
                connection.close()
                return index
            self.written += 1
        return len(pending)

    def _keep(self, report: ConnectionReport) -> None:
        with self._lock:
            self._pending.setdefault(report.connection_id, report)  # unless a newer one came meanwhile

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                self.flush()
            self._last_flush()
        finally:
            connection.close()  # this thread's own connection

    def _last_flush(self) -> None:
        """At shutdown: what was reported, then any row a connection that never reported its end left open."""
        self.flush()
        try:
            closed = close_open_connections(worker=self.worker, reason="worker stopped")
        except DatabaseError as exc:
            logger.warning("connection history: open rows of worker %s not closed (%s)", self.worker, exc)
            return
        if closed:
            logger.info("connection history: %d connections of worker %s closed at shutdown", closed, self.worker)
