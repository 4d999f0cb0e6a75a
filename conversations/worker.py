"""Wiring of one ingest worker: credentials -> source -> pipeline (+ after-commit listeners).

`stream_events` runs it in the main thread with signal handling; the single-process demo runs it in a thread.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.core.management.base import CommandError

from conversations import services
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import FatalSourceError
from conversations.genesys.sse import SSESource
from conversations.normalize import normalize_sse
from conversations.pipeline import Pipeline, Totals, normalized
from monitor_project.settings.genesys import GenesysSettings

logger = logging.getLogger("conversations.worker")

AfterCommit = Callable[[services.BatchResult], None]


def require_credentials(config: GenesysSettings) -> None:
    if not config.client_id:
        raise CommandError("GENESYSCLOUD_OAUTHCLIENT_ID (or GENESYS_CLIENT_ID) is not set")
    if not config.client_secret:
        raise CommandError("GENESYSCLOUD_OAUTHCLIENT_SECRET (or GENESYS_CLIENT_SECRET) is not set")


def build_sse_source(config: GenesysSettings, *, stop: threading.Event) -> SSESource:
    tokens = TokenProvider(login_url=config.login_url, client_id=config.client_id, client_secret=config.client_secret)
    return SSESource(
        api_url=config.api_url,
        tokens=tokens,
        last_event_id=services.load_checkpoint(source="sse"),
        read_timeout=settings.SSE_READ_TIMEOUT,
        backoff=Backoff(cap=settings.SSE_BACKOFF_MAX),
        stop=stop,
    )


def after_commit_listeners(source_name: str) -> list[AfterCommit]:
    """Worker-level listeners called with each committed batch (live broadcast, metrics, heartbeat)."""
    return []


@dataclass
class Worker:
    source_name: str
    stop: threading.Event

    def run(self, *, max_events: int | None = None) -> Totals:
        """Read and commit until stopped, the source ends, or max_events are committed."""
        config = settings.GENESYS
        require_credentials(config)
        source = build_sse_source(config, stop=self.stop)
        pipeline = Pipeline(
            source_name=self.source_name,
            batch_size=settings.INGEST_BATCH_SIZE,
            max_age=settings.INGEST_BATCH_MAX_AGE,
            queue_size=settings.INGEST_QUEUE_SIZE,
            after_commit=after_commit_listeners(self.source_name),
        )
        logger.info("worker starting: source %s at %s, resuming after id %s",
                    self.source_name, config.api_url, source.last_event_id or "(none)")
        pipeline.start_reader(normalized(source.messages(), normalize_sse))
        totals = pipeline.run(stop=self.stop, max_events=max_events)
        self.stop.set()
        source.close()
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
