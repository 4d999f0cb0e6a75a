"""`python manage.py stream_events`: the ingest worker. handle() wires things up; the worker loops."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from conversations.worker import Worker
from monitor_project.settings.genesys import EVENT_SOURCES

logger = logging.getLogger("conversations.stream_events")


class Command(BaseCommand):
    help = "Consume live Genesys Cloud conversation events and store them (runs until SIGTERM/SIGINT)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--source", choices=list(EVENT_SOURCES),
                            help="event source (default: GENESYS_EVENT_SOURCE)")
        parser.add_argument("--max-events", type=int, help="exit after this many events (rejects included) commit")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        previous = install_stop_handlers(stop)
        try:
            Worker(source_name=options["source"] or settings.GENESYS.event_source, stop=stop).run(
                max_events=options["max_events"]
            )
        finally:
            restore_handlers(previous)


Handlers = dict[int, Any]


def install_stop_handlers(stop: threading.Event) -> Handlers:
    """SIGTERM/SIGINT: stop reading, commit what was read, save the checkpoint, exit 0."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: committing what was read, then exiting", signal.Signals(signum).name)
        stop.set()

    return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}


def restore_handlers(previous: Handlers) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
