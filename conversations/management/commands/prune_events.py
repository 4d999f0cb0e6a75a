"""`python manage.py prune_events --older-than 90d [--dry-run]`: data retention for the raw tables.

Deletes raw events (by when they happened), rejects (by when they arrived) and closed stream connections
(by when they opened) older than the cutoff, in batches so no transaction holds locks for long. Conversations
and their participants stay: their derived state does not need the events any more. A duplicate of a pruned
event arriving later is stored again and folds to the same state; its hooks are keyed per conversation and
do not run twice.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models

from conversations.models import Conversation, Event, RejectedEvent, StreamConnection

logger = logging.getLogger(__name__)

_AGE = re.compile(r"^\s*(\d+)\s*(d|days?)?\s*$", re.IGNORECASE)


def parse_age(value: str) -> timedelta:
    """`90d`, `90 days` or `90`: days."""
    match = _AGE.match(value)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not an age in days; use e.g. 90d or 90")
    return timedelta(days=int(match.group(1)))


@dataclass(frozen=True)
class Target:
    label: str
    model: type[models.Model]
    old: models.Q


def targets(cutoff: datetime) -> list[Target]:
    return [
        Target("events", Event, models.Q(occurred_at__lt=cutoff)),
        Target("rejected events", RejectedEvent, models.Q(received_at__lt=cutoff)),
        # A connection still open is kept, however long ago it opened.
        Target(
            "stream connections",
            StreamConnection,
            models.Q(connected_at__lt=cutoff, disconnected_at__isnull=False),
        ),
    ]


def prune(target: Target, *, batch_size: int) -> int:
    """Delete in batches of primary keys; each DELETE is its own short transaction."""
    deleted = 0
    while True:
        pks = list(
            target.model.objects.filter(target.old).order_by().values_list("pk", flat=True)[:batch_size]
        )
        if not pks:
            return deleted
        count, _ = target.model.objects.filter(pk__in=pks).delete()
        deleted += count
        logger.debug("prune_events: %d %s deleted so far", deleted, target.label)


class Command(BaseCommand):
    help = "Delete raw events, rejects and closed stream connections older than an age; conversations stay."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than", required=True, type=parse_age, metavar="AGE", help="age in days, e.g. 90d or 90"
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
        )
        parser.add_argument("--batch-size", type=int, default=5000, help="rows per DELETE (default 5000)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        cutoff = datetime.now(UTC) - options["older_than"]
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(f"cutoff {cutoff:%Y-%m-%d %H:%M:%S} UTC ({options['older_than'].days} days)")
        for target in targets(cutoff):
            if options["dry_run"]:
                count = target.model.objects.filter(target.old).count()
            else:
                count = prune(target, batch_size=options["batch_size"])
            self.stdout.write(f"{target.label}: {verb} {count}")
            logger.info("prune_events: %s %d %s older than %s", verb, count, target.label, cutoff.isoformat())
        self.stdout.write(f"conversations kept: {Conversation.objects.count()}")
