"""`python manage.py backfill --since ISO [--until ISO]`, or `--source NAME [--since ISO] [--until ISO]`.

Fetches the conversations Genesys recorded in a window from the analytics details query (7-day intervals,
paged) and writes them through the batch writer as source "backfill": conversations that started, ended or
were wrapped up in the window get their state and their hooks, once. With `--source`, the windows are the gaps
of that source's connection history (each padded by GENESYS_BACKFILL_MARGIN), e.g. when a worker could not
backfill a gap itself. Safe to run twice: a record already stored is a duplicate, and state folding is
order-free.
"""
from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from conversations import backfill
from conversations.genesys.analytics import iso
from conversations.genesys.errors import SourceError
from conversations.normalize import PayloadError, parse_time
from conversations.worker import require_credentials

HISTORY_WINDOW = timedelta(days=7)  # how far back --source looks for gaps without --since
Window = tuple[datetime, datetime]


def moment(value: str) -> datetime:
    """An ISO 8601 time; without a zone, UTC."""
    try:
        return parse_time(value, field="time")
    except PayloadError:
        example = "2026-03-01T09:00:00Z"
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 time, e.g. {example}") from None


class Bar:
    """backfill.Progress on a tqdm bar whose total grows as each interval says how much it holds."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def found(self, total: int) -> None:
        self.bar.total = (self.bar.total or 0) + total
        self.bar.refresh()

    def done(self, count: int) -> None:
        self.bar.update(count)


class Command(BaseCommand):
    help = "Fetch a window (or the gaps of a source's connection history) from the analytics details query."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", type=moment, help="window start, ISO 8601 (required without --source)")
        parser.add_argument("--until", type=moment, help="window end, ISO 8601 (default: now)")
        parser.add_argument("--source", help="backfill the gaps of this source's connection history instead")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        until: datetime = options["until"] or datetime.now(UTC)
        since = self._since(options, until)
        require_credentials(settings.GENESYS)
        windows = self._windows(options["source"], since, until)
        results = [self._run(start, end, progress=not options["no_progress"]) for start, end in windows]
        self._totals(results)

    def _since(self, options: dict[str, Any], until: datetime) -> datetime:
        since: datetime | None = options["since"]
        if since is None and not options["source"]:
            raise CommandError("give --since (and --until), or --source to backfill a source's gaps")
        since = since or until - HISTORY_WINDOW
        if since >= until:
            raise CommandError(f"--since {iso(since)} is not before --until {iso(until)}")
        return since

    def _windows(self, source: str | None, since: datetime, until: datetime) -> list[Window]:
        if source is None:
            return [(since, until)]
        gaps = backfill.connection_gaps(source=source, since=since, until=until)
        for gap in gaps:
            self.stdout.write(f"{source}: {gap.describe()}")
        if not gaps:
            self.stdout.write(f"no gaps in the connection history of {source} between {iso(since)} and "
                              f"{iso(until)}")
        margin = timedelta(seconds=settings.GENESYS_BACKFILL_MARGIN)
        now = datetime.now(UTC)
        # Each gap padded by the margin, but no further out than the window asked for (itself padded).
        padded = (gap.window(margin) for gap in gaps)
        return backfill.merge_windows(
            (max(start, since - margin), min(end, until + margin, now)) for start, end in padded
        )

    def _run(self, since: datetime, until: datetime, *, progress: bool) -> backfill.BackfillResult:
        label = f"{iso(since)} .. {iso(until)}"
        with tqdm(desc=label, unit="conversation", total=0, disable=not progress) as bar:
            try:
                result = backfill.backfill(since=since, until=until, progress=Bar(bar))
            except SourceError as exc:
                raise CommandError(f"backfill of {label} failed: {exc}") from exc
        self.stdout.write(f"backfilled {result.summary()}")
        return result

    def _totals(self, results: list[backfill.BackfillResult]) -> None:
        if len(results) < 2:
            return
        self.stdout.write(
            f"{len(results)} windows: {sum(r.fetched for r in results)} conversations, "
            f"{sum(r.new_events for r in results)} new events, "
            f"{sum(r.duplicates for r in results)} duplicates, {sum(r.rejects for r in results)} rejected; "
            f"{sum(r.ended for r in results)} ended, {sum(r.wrapped_up for r in results)} wrapped up"
        )
