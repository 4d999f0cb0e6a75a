"""`python manage.py rerun_hooks`: re-run post-call hook deliveries chosen by conversation, trigger, hook or
failure time (filters combine). Attempts are kept; each chosen delivery is reset to pending and sent again."""
from __future__ import annotations

from argparse import ArgumentTypeError
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import QuerySet
from django.utils import timezone

from conversations import outbox
from conversations.hooks import TRIGGERS
from conversations.models import HookDelivery


class Command(BaseCommand):
    help = "Re-run post-call hook deliveries (by conversation, trigger, hook, or failed since a time)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--conversation", help="Genesys conversation id")
        parser.add_argument("--trigger", choices=TRIGGERS)
        parser.add_argument("--hook", help="dotted path of the hook, as configured")
        parser.add_argument("--failed-since", type=parse_since, metavar="ISO",
                            help="only deliveries failed at or after this time (ISO 8601; UTC by default)")
        parser.add_argument("--dry-run", action="store_true", help="count what would re-run, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        chosen = select_deliveries(options)
        matched = chosen.count()
        if options["dry_run"]:
            self.stdout.write(f"{matched} hook deliveries match; dry run, nothing re-run")
            return
        rerun = outbox.rerun_deliveries(chosen)
        skipped = matched - rerun
        self.stdout.write(f"{matched} hook deliveries matched, {rerun} re-run, {skipped} skipped (running)")


def select_deliveries(options: dict[str, Any]) -> QuerySet[HookDelivery]:
    if not any(options.get(name) for name in ("conversation", "trigger", "hook", "failed_since")):
        raise CommandError("choose deliveries with --conversation, --trigger, --hook and/or --failed-since")
    chosen = HookDelivery.objects.all()
    if options.get("conversation"):
        chosen = chosen.filter(conversation__conversation_id=options["conversation"])
    if options.get("trigger"):
        chosen = chosen.filter(trigger=options["trigger"])
    if options.get("hook"):
        chosen = chosen.filter(hook=options["hook"])
    if options.get("failed_since"):
        chosen = chosen.filter(status=HookDelivery.Status.FAILED, finished_at__gte=options["failed_since"])
    return chosen


def parse_since(value: str) -> datetime:
    """ISO 8601 date or time; without an offset it is taken as UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)
