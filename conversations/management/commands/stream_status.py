"""`manage.py stream_status [--check] [--this-host]`: what each stream worker last said about itself."""

from __future__ import annotations

import socket
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from conversations import heartbeat
from conversations.models import WorkerHeartbeat


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class Command(BaseCommand):
    help = (
        "Show each stream worker's heartbeat; with --check, exit 1 when the stream is stale (a healthcheck)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--check",
            action="store_true",
            help="exit 1 when no worker's stream is fresh (STREAM_STALE_SECONDS)",
        )
        parser.add_argument(
            "--this-host",
            action="store_true",
            help="only the workers of this host (a container's own healthcheck)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        host = socket.gethostname() if options["this_host"] else None
        rows = heartbeat.recent_heartbeats(host=host)
        freshness = heartbeat.stream_freshness(heartbeats=rows)
        if not options["check"] or options["verbosity"] > 1:
            self.print_table(rows)
        if freshness.stale:
            message = f"stream stale: {freshness.reason()}"
            if options["check"]:
                raise CommandError(message, returncode=1)
            self.stdout.write(message)
        elif options["check"] or rows:
            self.stdout.write(f"stream fresh: {freshness.reason()}")

    def print_table(self, rows: list[WorkerHeartbeat]) -> None:
        if not rows:
            self.stdout.write("no stream worker has written a heartbeat")
            return
        at = heartbeat.now()
        header = ("worker", "source", "beat", "connected", "last event", "committed", "reconnects")
        lines = [header] + [
            (
                row.worker,
                row.source,
                age(heartbeat.seconds_since(row.beat_at, at=at)),
                "yes" if row.connected else "no",
                age(heartbeat.seconds_since(row.last_event_at, at=at)),
                str(row.events_committed),
                str(row.reconnects),
            )
            for row in rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            self.stdout.write("  ".join(cells).rstrip())
