"""`python manage.py stream_events`: the ingest worker. handle() wires things up; the worker loops.

On SIGTERM or SIGINT it exits 0 within the time it takes to commit what was already read (one batch), plus
2 s for the reader to leave the source, plus, with no broker, HOOK_INPROCESS_SHUTDOWN_GRACE seconds for hooks
running in this process to finish (10 s by default): whatever the backlog of hooks, the rest stays pending in
the outbox for the next start."""
from __future__ import annotations

import logging
import signal
from argparse import ArgumentTypeError
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
        parser.add_argument("--max-events", type=event_count, metavar="N",
                            help="exit after this many events (rejects included) commit; at least 1")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        previous = install_stop_handlers(stop)
        try:
            Worker(source_name=options["source"] or settings.GENESYS.event_source, stop=stop).run(
                max_events=options["max_events"]
            )
        finally:
            restore_handlers(previous)


def event_count(value: str) -> int:
    """--max-events: a whole number of at least 1 (0 or less would mean "exit at once, having read nothing")."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ArgumentTypeError(f"expected a whole number of at least 1, not {value!r}")
    return count


Handlers = dict[int, Any]


def install_stop_handlers(stop: threading.Event) -> Handlers:
    """SIGTERM/SIGINT: stop reading, commit what was read, save the checkpoint, let running hooks finish
    within their grace, exit 0."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: committing what was read, then exiting", signal.Signals(signum).name)
        stop.set()

    return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}


def restore_handlers(previous: Handlers) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
