"""`python manage.py stream_events`: the ingest worker. handle() wires things up; the pipeline loops."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from conversations import services
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import FatalSourceError
from conversations.genesys.sse import SSESource
from conversations.normalize import normalize_sse
from conversations.pipeline import Pipeline, normalized

logger = logging.getLogger("conversations.stream_events")


class Command(BaseCommand):
    help = "Consume live Genesys Cloud conversation events and store them (runs until SIGTERM/SIGINT)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--source", choices=["sse"], help="event source (default: GENESYS_EVENT_SOURCE)")
        parser.add_argument("--max-events", type=int, help="exit after this many events (rejects included) commit")

    def handle(self, *args: Any, **options: Any) -> None:
        config = settings.GENESYS
        source_name = options["source"] or config.event_source
        require_credentials(config)
        stop = threading.Event()
        install_stop_handlers(stop)
        source = build_source(config, stop=stop)
        pipeline = Pipeline(
            source_name=source_name,
            batch_size=settings.INGEST_BATCH_SIZE,
            max_age=settings.INGEST_BATCH_MAX_AGE,
            queue_size=settings.INGEST_QUEUE_SIZE,
        )
        logger.info("stream_events starting: source %s at %s, resuming after id %s",
                    source_name, config.api_url, source.last_event_id or "(none)")
        pipeline.start_reader(normalized(source.messages(), normalize_sse))
        totals = pipeline.run(stop=stop, max_events=options["max_events"])
        stop.set()
        source.close()
        logger.info("stream_events stopped: %d committed (%d new, %d duplicate, %d rejected) in %d batches",
                    totals.committed, totals.new_events, totals.duplicates, totals.rejects, totals.batches)
        raise_source_error(pipeline.source_error)


def require_credentials(config: Any) -> None:
    if not config.client_id:
        raise CommandError("GENESYSCLOUD_OAUTHCLIENT_ID (or GENESYS_CLIENT_ID) is not set")
    if not config.client_secret:
        raise CommandError("GENESYSCLOUD_OAUTHCLIENT_SECRET (or GENESYS_CLIENT_SECRET) is not set")


def build_source(config: Any, *, stop: threading.Event) -> SSESource:
    tokens = TokenProvider(login_url=config.login_url, client_id=config.client_id, client_secret=config.client_secret)
    return SSESource(
        api_url=config.api_url,
        tokens=tokens,
        last_event_id=services.load_checkpoint(source="sse"),
        read_timeout=settings.SSE_READ_TIMEOUT,
        backoff=Backoff(cap=settings.SSE_BACKOFF_MAX),
        stop=stop,
    )


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT: stop reading, commit what was read, save the checkpoint, exit 0."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: committing what was read, then exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def raise_source_error(error: BaseException | None) -> None:
    if error is None:
        return
    if isinstance(error, FatalSourceError):
        raise CommandError(str(error))
    logger.error("the source failed unexpectedly", exc_info=error)
    raise CommandError(f"the source failed unexpectedly: {type(error).__name__}: {error}")
