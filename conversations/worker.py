"""Wiring of one ingest worker: credentials -> source -> pipeline (+ after-commit listeners).

`stream_events` runs it in the main thread with signal handling; the single-process demo runs it in a thread.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import CommandError

from conversations import metrics, outbox, realtime, services, tasks
from conversations.backfill import GapFiller
from conversations.connections import ConnectionRecorder
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import FatalSourceError
from conversations.genesys.notifications import (
    ConnectionListener,
    NotificationsApi,
    NotificationsConfig,
    NotificationsSource,
)
from conversations.genesys.sse import SSESource
from conversations.heartbeat import Heartbeat
from conversations.leadership import Lease, LeaseLost
from conversations.normalize import normalize_sse
from conversations.pipeline import DatabaseUnavailable, Envelope, Pipeline, Totals, normalized
from monitor_project.settings.genesys import GenesysSettings

logger = logging.getLogger("conversations.worker")

AfterCommit = Callable[[services.BatchResult], None]
# At shutdown, how long the reader thread gets to leave its source (a reader blocked on a full queue is not waited).
READER_EXIT_SECONDS = 2.0


def require_credentials(config: GenesysSettings) -> None:
    if not config.client_id:
        raise CommandError("GENESYSCLOUD_OAUTHCLIENT_ID (or GENESYS_CLIENT_ID) is not set")
    if not config.client_secret:
        raise CommandError("GENESYSCLOUD_OAUTHCLIENT_SECRET (or GENESYS_CLIENT_SECRET) is not set")


Source = SSESource | NotificationsSource


def build_sse_source(
    config: GenesysSettings, *, stop: threading.Event, on_connection: ConnectionListener | None = None
) -> SSESource:
    tokens = TokenProvider(login_url=config.login_url, client_id=config.client_id, client_secret=config.client_secret)
    return SSESource(
        api_url=config.api_url,
        tokens=tokens,
        last_event_id=services.load_checkpoint(source="sse"),
        read_timeout=settings.SSE_READ_TIMEOUT,
        backoff=Backoff(cap=settings.SSE_BACKOFF_MAX),
        stop=stop,
        on_connection=on_connection,
    )


def build_notifications_source(
    config: GenesysSettings, *, stop: threading.Event, on_connection: ConnectionListener | None = None
) -> NotificationsSource:
    tokens = TokenProvider(login_url=config.login_url, client_id=config.client_id, client_secret=config.client_secret)
    return NotificationsSource(
        api=NotificationsApi(api_url=config.api_url, tokens=tokens),
        config=NotificationsConfig(
            queue_ids=config.queue_ids,
            user_ids=config.user_ids,
            idle_timeout=config.notifications_idle_timeout,
            max_channels=config.notifications_max_channels,
            sync_interval=config.notifications_sync_interval,
        ),
        backoff=lambda: Backoff(cap=settings.SSE_BACKOFF_MAX),
        stop=stop,
        on_connection=on_connection,
    )


SOURCE_BUILDERS: dict[str, Callable[..., Source]] = {
    "sse": build_sse_source,
    "notifications": build_notifications_source,
}


def build_source(
    name: str, config: GenesysSettings, *, stop: threading.Event, on_connection: ConnectionListener | None = None
) -> Source:
    if name not in SOURCE_BUILDERS:
        raise CommandError(f"unknown event source {name!r}; use one of: {', '.join(sorted(SOURCE_BUILDERS))}")
    return SOURCE_BUILDERS[name](config, stop=stop, on_connection=on_connection)


def source_envelopes(source: Source) -> Iterable[Envelope]:
    """What the reader thread puts on the pipeline: SSE messages carry a resume cursor, notifications none."""
    if isinstance(source, SSESource):
        return normalized(source.messages(), normalize_sse)
    return (Envelope(item, None) for item in source.events())


def after_commit_listeners(source_name: str) -> list[AfterCommit]:
    """Worker-level listeners called with each committed batch (live broadcast, metrics, heartbeat)."""
    listeners = [metrics.batch_listener(source_name)]
    live = realtime.after_commit_listener()  # None when no live page can hear this process
    if live is not None:
        listeners.append(live)
    listeners.extend(outbox.after_commit_listeners())  # none: it says where hooks run
    return listeners


@dataclass
class Worker:
    source_name: str
    stop: threading.Event

    def run(self, *, max_events: int | None = None) -> Totals:
        """Wait to be the source's only consumer, then read and commit until stopped, the source ends, or
        max_events are committed."""
        config = settings.GENESYS
        require_credentials(config)
        lease = Lease(source=self.source_name, ttl=settings.STREAM_LEASE_SECONDS)
        if not lease.wait_for(self.stop):
            return Totals()
        lease.start_renewing()
        try:
            return self.consume(config, lease=lease, max_events=max_events)
        except (LeaseLost, DatabaseUnavailable) as exc:
            raise CommandError(str(exc)) from exc
        finally:
            lease.release()

    def consume(self, config: GenesysSettings, *, lease: Lease, max_events: int | None) -> Totals:
        recorder = ConnectionRecorder()
        # Hears every (re)connect too, and backfills the gap before it onto this pipeline (backfill.py).
        gaps = GapFiller.for_worker(self.source_name, stop=self.stop)
        # Built once the lease is ours: the checkpoint to resume from is the one the previous holder left.
        source = build_source(self.source_name, config, stop=self.stop, on_connection=gaps.tee(recorder))
        beat = Heartbeat(source_name=self.source_name, stats=source.stats)
        pipeline = Pipeline.from_settings(
            self.source_name,
            after_commit=[*after_commit_listeners(self.source_name), beat.record_batch],
            guard=lease.fence,
        )
        logger.info("worker starting: source %s at %s, resuming after id %s",
                    self.source_name, config.api_url, source.last_event_id or "(none)")
        reader = pipeline.start_reader(source_envelopes(source))
        metrics.serve_worker_metrics()
        # Connection history is written until the source has closed its connections; gaps are filled meanwhile.
        # Without a broker, hooks run on the in-process runner, stopped last (within its grace) at shutdown.
        with tasks.in_process_hooks(), recorder.running(), gaps.running(pipeline):
            try:
                with beat.running():
                    totals = pipeline.run(stop=self.stop, max_events=max_events)
            finally:
                self.stop.set()
                source.close()
                reader.join(timeout=READER_EXIT_SECONDS)  # its source reports the last disconnect on the way out
        logger.info("worker stopped: %d committed (%d new, %d duplicate, %d rejected) in %d batches",
                    totals.committed, totals.new_events, totals.duplicates, totals.rejects, totals.batches)
        raise_source_error(pipeline.source_error)
        return totals


def raise_source_error(error: BaseException | None) -> None:
    if error is None:
        return
    if isinstance(error, FatalSourceError):
        raise CommandError(str(error))
    logger.error("the source failed unexpectedly", exc_info=error)
    raise CommandError(f"the source failed unexpectedly: {type(error).__name__}: {error}")
