"""Feed rejected input through the pipeline again, after a fix to the normalizer.

A reject keeps the raw text exactly as it arrived. Reprocessing runs that text through the same road as live
input -- the normalizer of its source, then `services.ingest_batch` with that source -- so a reject that parses
now becomes an ordinary event (derived state, signals and post-call hooks included).

Decisions:
* The rejects of one source go into ONE batch (one transaction), whatever their number.
* A reject that now parses is marked `reprocessed_at` right after its batch commits. The two writes are not
  one transaction on purpose: `ingest_batch` sends its signals after its own commit, and wrapping it would
  send them before anything is committed. If the process dies in between, running the action again is
  harmless: the events are already stored (same dedupe key), count as duplicates, and the reject is marked.
* A keep-alive (`{}`, empty data) is "parsed" too: nothing to store, the reject is marked reprocessed.
* A reject that still fails stays pending, and its `error` is replaced with what the current code says now;
  the raw text is never touched.
* Already reprocessed rejects are skipped, so selecting them again does nothing.
* The batch moves no resume cursor (`last_event_id` stays), but the source checkpoint's `events_committed`
  grows by the events stored, as for any batch.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from django.db.models import QuerySet

from conversations import services
from conversations.events import Reject, TypedEvent
from conversations.models import RejectedEvent
from conversations.normalize import normalize_sse
from conversations.normalize_analytics import normalize_conversation
from conversations.normalize_notifications import normalize_notification

logger = logging.getLogger(__name__)

Outcome = list[TypedEvent | Reject]


def renormalize(reject: RejectedEvent) -> Outcome:
    """The raw text through the current normalizer of the source it came from."""
    if reject.source == "notifications":
        return normalize_notification(reject.raw)
    if reject.source == "backfill":
        try:
            record = orjson.loads(reject.raw)
        except orjson.JSONDecodeError as exc:
            return [Reject(source=reject.source, raw=reject.raw, error=f"JSONDecodeError: {exc}")]
        return [normalize_conversation(record)]
    outcome = normalize_sse(reject.raw, sse_id=reject.sse_id or None, source=reject.source)
    return [] if outcome is None else [outcome]


@dataclass
class ReprocessResult:
    reprocessed: int = 0  # parse now; marked reprocessed
    new_events: int = 0  # events stored by this run
    duplicates: int = 0  # events that were already stored (an earlier, interrupted run)
    still_failing: int = 0  # still rejected; error updated
    skipped: int = 0  # reprocessed before; left alone (counted when the rejects are passed in)
    more_pending: bool = False  # the selection had more pending rejects than one run takes


def reprocess_rejects(rejects: Iterable[RejectedEvent]) -> ReprocessResult:
    """Normalize each pending reject's raw text again and ingest what parses, one batch per source."""
    result = ReprocessResult()
    parsed: dict[str, list[tuple[RejectedEvent, Outcome]]] = defaultdict(list)
    failing: list[RejectedEvent] = []
    for reject in rejects:
        if reject.reprocessed_at is not None:
            result.skipped += 1
            continue
        outcome = renormalize(reject)
        still = [item for item in outcome if isinstance(item, Reject)]
        if still:
            reject.error = still[0].error
            failing.append(reject)
        else:
            parsed[reject.source].append((reject, outcome))
    for source, group in parsed.items():
        ingest_group(source, group, result)
    record_failures(failing, result)
    return result


def reprocess_pending(queryset: QuerySet[RejectedEvent], *, limit: int) -> ReprocessResult:
    """Reprocess at most `limit` pending rejects of a selection, oldest first (a request stays short)."""
    selected = list(queryset.filter(reprocessed_at__isnull=True).order_by("received_at", "pk")[: limit + 1])
    result = reprocess_rejects(selected[:limit])
    result.more_pending = len(selected) > limit
    return result


def ingest_group(source: str, group: list[tuple[RejectedEvent, Outcome]], result: ReprocessResult) -> None:
    events = [item for _, outcome in group for item in outcome if isinstance(item, TypedEvent)]
    new = duplicates = 0
    if events:
        batch = services.ingest_batch(events=events, source=source)
        new, duplicates = len(batch.new_events), batch.duplicates
    pks = [reject.pk for reject, _ in group]
    marked = RejectedEvent.objects.filter(pk__in=pks, reprocessed_at__isnull=True)
    result.reprocessed += marked.update(reprocessed_at=datetime.now(UTC))
    result.new_events += new
    result.duplicates += duplicates
    logger.info("reprocessed %d rejects from %s: %d events (%d new, %d already stored)",
                len(group), source, len(events), new, duplicates)


def record_failures(failing: list[RejectedEvent], result: ReprocessResult) -> None:
    if not failing:
        return
    RejectedEvent.objects.bulk_update(failing, ["error"])
    result.still_failing += len(failing)
    for reject in failing:
        logger.info("reject %s from %s still fails: %s", reject.pk, reject.source, reject.error)
