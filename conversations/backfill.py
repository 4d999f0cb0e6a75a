"""Gap backfill: what the live sources missed, fetched again from the analytics details query.

The Notifications WebSocket has no replay: whatever Genesys publishes while a socket is down is gone. The
connection history (StreamConnection rows, one per socket) says when that was. `find_gaps` reads it:

* start-up after downtime: from the moment the previous worker was last known alive (its last sign of life
  before its disconnect, or its last heartbeat or event when it never recorded one, e.g. after SIGKILL) to the
  new worker's first connect;
* a reconnect: from a socket's last sign of life to the next socket's connect (same channel, or a new one
  after an eviction, an expiry or a revoked token);
* not a gap: a socket replaced on its channel while the old one still delivered (socket_closing handover).

`backfill(since=, until=)` queries that window (genesys/analytics.py: 7-day intervals, paged, deduplicated by
conversation id), keeps the conversations that overlap it, normalizes each record to one typed event with
source "backfill" (normalize_analytics.py) and hands them to a sink: `services.ingest_batch` page by page (the
`backfill` command), or the running worker's own pipeline queue (`GapFiller`), so backfilled events are
committed by the same writer, under the same lease, with the same hooks and live updates as streamed ones.
State folding is order-free and idempotent, so a conversation that was partly streamed and partly backfilled
ends in the state either source alone would give it, and its hooks run once.
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from django.conf import settings
from django.db import DatabaseError
from django.db import connection as db_connection

from conversations import services
from conversations.connections import worker_name
from conversations.events import Reject, TypedEvent
from conversations.genesys.analytics import AnalyticsApi, Page, intervals, iso
from conversations.genesys.auth import TokenProvider
from conversations.genesys.errors import FatalSourceError, SourceError, TransientError
from conversations.genesys.notifications import (
    CatalogNames,
    ConnectionListener,
    ConnectionReport,
    NotificationsApi,
)
from conversations.models import StreamConnection
from conversations.normalize_analytics import SOURCE, normalize_conversation, overlaps
from conversations.normalize_notifications import Names
from conversations.pipeline import Envelope, Pipeline
from monitor_project.settings.genesys import GenesysSettings

logger = logging.getLogger(__name__)

Item = TypedEvent | Reject
Sink = Callable[[list[Item]], "services.BatchResult | None"]
# Sources whose gaps the worker backfills. SSE resumes with Last-Event-ID instead (and a relay may not serve
# the analytics API); `manage.py backfill --source sse` still fills its history's gaps on demand.
GAP_SOURCES = frozenset({"notifications"})
HISTORY_ROWS = 200  # connections read to find the start-up gap
IDS_LOGGED = 50
FAILED_GAP_RETRIES = 3
FAILED_GAP_RETRY_SECONDS = 60.0


class BackfillInterrupted(Exception):
    """The worker stopped while a backfill was feeding it; run the window again (`manage.py backfill`)."""


# --- gaps in the connection history ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """One connection's coverage: from its connect until it ended (None: it is still delivering)."""

    connection_id: str
    channel_id: str
    run: str  # the worker run it belongs to (host:pid)
    connected_at: datetime
    ended_at: datetime | None
    reason: str = ""
    # Its last sign of life (heartbeat or event). A socket that went silent is closed only once the client
    # gives up on it (idle timeout, then an unanswered ping): what it missed started when it went silent.
    last_seen: datetime | None = None

    @property
    def silent_since(self) -> datetime | None:
        if self.ended_at is None:
            return None
        return min(self.ended_at, self.last_seen) if self.last_seen is not None else self.ended_at


@dataclass(frozen=True, slots=True)
class Gap:
    start: datetime
    end: datetime
    kind: str  # "downtime" | "reconnect" | "new channel" | "down now"
    cause: str  # why the connection before it ended
    closed_by: str | None  # the connection that ended the gap; None while the source is still down

    def window(self, margin: timedelta) -> tuple[datetime, datetime]:
        return self.start - margin, self.end + margin

    def describe(self) -> str:
        seconds = (self.end - self.start).total_seconds()
        after = f", after: {self.cause}" if self.cause else ""
        return f"{self.kind} gap {iso(self.start)} .. {iso(self.end)} ({seconds:.1f}s{after})"


def find_gaps(spans: Iterable[Span], *, now: datetime | None = None) -> list[Gap]:
    """Replay connects and ends in time order: every end not covered by another socket on its channel opens a
    gap, closed by the next connect that is not a handover. A new run closes every gap the earlier runs left
    open, as one downtime gap. With `now`, gaps still open end there."""
    open_by_channel: dict[str, set[str]] = {}
    pending: list[Span] = []
    gaps: list[Gap] = []
    for _, opening, span in sorted(_moments(spans), key=lambda m: (m[0], not m[1])):
        sockets = open_by_channel.setdefault(span.channel_id, set())
        if not opening:
            sockets.discard(span.connection_id)
            if not sockets:  # nothing else on its channel carries on: events may be lost from here
                pending.append(span)
            continue
        handover = bool(sockets)
        sockets.add(span.connection_id)
        if pending and not handover:
            gaps.append(_close_gap(pending, span))
    if now is not None and pending:
        first = min(pending, key=lambda s: s.silent_since or now)
        gaps.append(Gap(first.silent_since or now, now, "down now", first.reason, None))
    return gaps


def _moments(spans: Iterable[Span]) -> Iterator[tuple[datetime, bool, Span]]:
    for span in spans:
        yield span.connected_at, True, span
        if span.ended_at is not None:
            yield max(span.ended_at, span.connected_at), False, span


def _close_gap(pending: list[Span], opened: Span) -> Gap:
    """Take the ended connections this connect replaces out of `pending`; the gap runs from the first one."""
    earlier_runs = [s for s in pending if s.run != opened.run]
    same_channel = [s for s in pending if s.channel_id == opened.channel_id]
    taken = earlier_runs or same_channel[:1] or pending[:1]
    for span in taken:
        pending.remove(span)
    first = min(taken, key=lambda s: s.silent_since or opened.connected_at)
    if earlier_runs:
        kind = "downtime"
    else:
        kind = "reconnect" if first.channel_id == opened.channel_id else "new channel"
    start = min(first.silent_since or opened.connected_at, opened.connected_at)
    return Gap(start, opened.connected_at, kind, first.reason, opened.connection_id)


def span_of_row(row: StreamConnection, *, alive_after: datetime | None = None) -> Span:
    """A history row; one that never recorded its end ended at its last sign of life, unless recent."""
    last = _last_seen(row.connected_at, row.last_heartbeat_at, row.last_event_at)
    ended = row.disconnected_at
    if ended is None:
        ended = None if alive_after is not None and last >= alive_after else last
    return Span(row.connection_id or f"row-{row.pk}", row.channel_id, row.worker, row.connected_at, ended,
                row.disconnect_reason, last)


def span_of_report(report: ConnectionReport, *, run: str) -> Span:
    last = _last_seen(report.connected_at, report.last_heartbeat_at, report.last_event_at)
    return Span(report.connection_id, report.channel_id, run, report.connected_at, report.disconnected_at,
                report.disconnect_reason, last)


def _last_seen(*moments: datetime | None) -> datetime:
    return max(t for t in moments if t is not None)


def connection_spans(*, source: str, until: datetime | None = None, limit: int = HISTORY_ROWS,
                     exclude: Iterable[str] = (), alive_after: datetime | None = None) -> list[Span]:
    """The source's `limit` most recent connections (that opened before `until`), oldest first."""
    rows = StreamConnection.objects.filter(source=source).exclude(connection_id__in=list(exclude))
    if until is not None:
        rows = rows.filter(connected_at__lt=until)
    latest = list(rows.order_by("-connected_at", "-pk")[:limit])
    return [span_of_row(row, alive_after=alive_after) for row in reversed(latest)]


def connection_gaps(*, source: str, since: datetime, until: datetime, limit: int = 10_000) -> list[Gap]:
    """The gaps of a source's connection history that touch [since, until]; one still open ends at `until`."""
    now = datetime.now(UTC)
    alive_after = now - timedelta(seconds=settings.STREAM_STALE_SECONDS)
    spans = connection_spans(source=source, until=until, limit=limit, alive_after=alive_after)
    return [g for g in find_gaps(spans, now=min(until, now)) if g.end >= since and g.start <= until]


def merge_windows(windows: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Overlapping or touching windows as one, in time order."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def clip(window: tuple[datetime, datetime], *, longest: timedelta, now: datetime | None = None,
         ) -> tuple[datetime, datetime]:
    """Never past now; at most `longest` (the most recent part)."""
    start, end = window
    end = min(end, now or datetime.now(UTC))
    return max(start, end - longest), end


# --- the backfill ------------------------------------------------------------------------------------------


class Progress(Protocol):
    def found(self, total: int) -> None:
        """An interval holds this many conversations."""

    def done(self, count: int) -> None:
        """This many more conversations were fetched."""


@dataclass
class BackfillResult:
    since: datetime
    until: datetime
    intervals: int = 0
    pages: int = 0
    fetched: int = 0  # distinct conversations the query returned
    skipped: int = 0  # returned but outside the window (the platform selects by start day)
    queued: int = 0  # events and rejects handed to the sink
    new_events: int = 0
    duplicates: int = 0
    rejects: int = 0
    ended: int = 0
    wrapped_up: int = 0
    conversation_ids: list[str] = field(default_factory=list)

    def count(self, items: Sequence[Item], batch: services.BatchResult | None) -> None:
        self.queued += len(items)
        self.conversation_ids += [i.conversation_id for i in items if isinstance(i, TypedEvent)]
        if batch is None:
            return
        self.new_events += len(batch.new_events)
        self.duplicates += batch.duplicates
        self.rejects += len(batch.rejects)
        self.ended += sum(1 for t in batch.transitions if t.new_state == "ended")
        self.wrapped_up += sum(1 for t in batch.transitions if t.new_state == "wrapped_up")

    def summary(self) -> str:
        window = f"{iso(self.since)} .. {iso(self.until)}"
        written = f"{self.queued} events queued"
        if self.new_events or self.duplicates or self.rejects:
            written = (f"{self.new_events} new events, {self.duplicates} duplicates, "
                       f"{self.rejects} rejected; {self.ended} ended, {self.wrapped_up} wrapped up")
        return (f"{window}: {self.intervals} intervals, {self.pages} pages, {self.fetched} conversations "
                f"({self.skipped} outside the window), {written}")

    def ids_text(self) -> str:
        shown = ", ".join(self.conversation_ids[:IDS_LOGGED])
        more = len(self.conversation_ids) - IDS_LOGGED
        return shown + (f" and {more} more" if more > 0 else "") if shown else "none"


def analytics_api(config: GenesysSettings, *, stop: threading.Event | None = None) -> AnalyticsApi:
    return AnalyticsApi(api_url=config.api_url, tokens=_tokens(config), stop=stop)


def catalog_names(config: GenesysSettings) -> Names:
    """Queue names from the queue listing, wrap-up code names on demand, as the Notifications source has."""
    api = NotificationsApi(api_url=config.api_url, tokens=_tokens(config))
    try:
        queues = api.queues()
    except SourceError as exc:
        logger.warning("backfill: queue names unavailable (%s); names come from the records' ACD legs", exc)
        queues = []
    return CatalogNames(api, queues)


def _tokens(config: GenesysSettings) -> TokenProvider:
    return TokenProvider(login_url=config.login_url, client_id=config.client_id,
                         client_secret=config.client_secret)


def ingest_sink(*, source: str = SOURCE) -> Sink:
    """Each batch written in its own transaction by the batch writer, as a worker's pipeline would."""

    def write(items: list[Item]) -> services.BatchResult:
        events = [i for i in items if isinstance(i, TypedEvent)]
        rejects = [i for i in items if isinstance(i, Reject)]
        return services.ingest_batch(events=events, rejects=rejects, source=source)

    return write


def pipeline_sink(pipeline: Pipeline, *, stopped: Callable[[], bool]) -> Sink:
    """Put items on a running worker's queue, waiting while it is full (backpressure), until it stops."""

    def put(items: list[Item]) -> None:
        for item in items:
            while True:
                if stopped():
                    raise BackfillInterrupted("the worker stopped while a backfill was feeding it")
                try:
                    pipeline.queue.put(Envelope(item, None), timeout=0.25)
                    break
                except queue.Full:
                    continue

    return put


def backfill(
    *, since: datetime, until: datetime, sink: Sink | None = None, progress: Progress | None = None,
    api: AnalyticsApi | None = None, names: Names | None = None,
) -> BackfillResult:
    """Fetch every conversation overlapping [since, until] and feed it to the sink (by default, the database).

    Raises FatalSourceError (permissions, bad configuration) or TransientError (the platform kept failing).
    """
    result = BackfillResult(since=since, until=until, intervals=len(intervals(since, until)))
    owned = api is None
    api = api or analytics_api(settings.GENESYS)
    names = names if names is not None else catalog_names(settings.GENESYS)
    sink = sink or ingest_sink()
    try:
        for page in api.pages(since, until):
            take_page(page, result=result, sink=sink, names=names, progress=progress)
    finally:
        if owned:
            api.close()
    logger.info("backfill %s", result.summary())
    logger.info("backfill %s .. %s: conversations %s", iso(since), iso(until), result.ids_text())
    return result


def take_page(
    page: Page, *, result: BackfillResult, sink: Sink, names: Names, progress: Progress | None
) -> None:
    result.pages += 1
    if progress is not None and page.number == 1:
        progress.found(page.total_hits)
    kept = [c for c in page.conversations if overlaps(c, result.since, result.until)]
    result.fetched += len(page.conversations)
    result.skipped += len(page.conversations) - len(kept)
    items = [normalize_conversation(record, names=names) for record in kept]
    if items:
        result.count(items, sink(items))
    if progress is not None:
        progress.done(len(page.conversations))


# --- the worker's side: fill each gap as the source reconnects -------------------------------------------


class GapFiller:
    """A worker's connection-history listener and backfill thread.

    Every report of a new connection is a (re)connect: the thread finds the gap that connect closes (from the
    history the previous runs left and this run's own reports), waits GENESYS_BACKFILL_DELAY (the analytics
    records lag behind the live events), then backfills the gap, padded by GENESYS_BACKFILL_MARGIN on each
    side, onto the worker's pipeline queue. Disabled (a pass-through) unless GENESYS_BACKFILL_ON_GAP is on and
    the source is one whose gaps lose events.
    """

    def __init__(self, *, source: str, stop: threading.Event, enabled: bool = True) -> None:
        self.source = source
        self.stop = stop
        # This run's own name: rows an earlier process left (even one with our host and pid) are earlier runs.
        self.run = f"{worker_name()}:{secrets.token_hex(4)}"
        self.enabled = enabled
        self.margin = timedelta(seconds=settings.GENESYS_BACKFILL_MARGIN)
        self.delay = timedelta(seconds=settings.GENESYS_BACKFILL_DELAY)
        self.max_gap = timedelta(seconds=settings.GENESYS_BACKFILL_MAX_GAP)
        self._reports: dict[str, ConnectionReport] = {}
        self._history: list[Span] | None = None
        self._lock = threading.Lock()
        self._connects: queue.Queue[str] = queue.Queue()
        self._quit = threading.Event()
        self._api: AnalyticsApi | None = None
        self._names: Names | None = None

    @classmethod
    def for_worker(cls, source: str, *, stop: threading.Event) -> GapFiller:
        enabled = settings.GENESYS_BACKFILL_ON_GAP and source in GAP_SOURCES
        return cls(source=source, stop=stop, enabled=enabled)

    def tee(self, listener: ConnectionListener) -> ConnectionListener:
        """`listener`, and this filler too when it is enabled."""
        if not self.enabled:
            return listener

        def both(report: ConnectionReport) -> None:
            listener(report)
            self(report)

        return both

    def __call__(self, report: ConnectionReport) -> None:
        """From the source's threads: never blocks."""
        with self._lock:
            new = report.connection_id not in self._reports
            self._reports[report.connection_id] = report
        if new:
            self._connects.put(report.connection_id)

    @contextmanager
    def running(self, pipeline: Pipeline) -> Iterator[GapFiller]:
        """Fill gaps onto `pipeline` in a thread while the block runs."""
        if not self.enabled:
            yield self
            return
        sink = pipeline_sink(pipeline, stopped=lambda: self.stop.is_set() or self._quit.is_set())
        thread = threading.Thread(target=self._loop, args=(sink,), name=f"{self.source}-backfill",
                                  daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._quit.set()
            thread.join(timeout=5)

    def _loop(self, sink: Sink) -> None:
        try:
            while not (self._quit.is_set() or self.stop.is_set()):
                try:
                    connection_id = self._connects.get(timeout=0.1)
                except queue.Empty:
                    continue
                self._fill_before(connection_id, sink)
        finally:
            db_connection.close()  # this thread's own connection
            if self._api is not None:
                self._api.close()

    def gap_before(self, connection_id: str) -> Gap | None:
        """The gap the connect of `connection_id` closed, if it closed one."""
        with self._lock:
            reports = list(self._reports.values())
        if self._history is None:
            # Read once, at this run's first connect: the rows the runs before this one left.
            self._history = connection_spans(source=self.source, exclude=[r.connection_id for r in reports])
        spans = [*self._history, *(span_of_report(r, run=self.run) for r in reports)]
        return next((g for g in find_gaps(spans) if g.closed_by == connection_id), None)

    def _fill_before(self, connection_id: str, sink: Sink) -> None:
        try:
            gap = self.gap_before(connection_id)
        except DatabaseError as exc:
            logger.warning("backfill: connection history of %s unreadable (%s); the gap before connection %s "
                           "is not backfilled", self.source, exc, connection_id)
            return
        if gap is None:
            return
        since, until = clip(gap.window(self.margin), longest=self.max_gap, now=gap.end + self.margin)
        logger.info("backfill: %s on source %s; backfilling %s .. %s in %.0fs", gap.describe(), self.source,
                    iso(since), iso(until), self._seconds_until(gap.end + self.delay))
        if self._quit.wait(self._seconds_until(gap.end + self.delay)) or self.stop.is_set():
            self._not_filled(since, until, "the worker is stopping")
            return
        self._fill(since, until, sink)

    def _fill(self, since: datetime, until: datetime, sink: Sink) -> None:
        for attempt in range(1, FAILED_GAP_RETRIES + 1):
            try:
                backfill(since=since, until=until, sink=sink, api=self._analytics(), names=self._catalog())
                return
            except BackfillInterrupted:
                self._not_filled(since, until, "the worker stopped while it was being fed")
                return
            except FatalSourceError as exc:
                self._not_filled(since, until, str(exc))
                return
            except TransientError as exc:
                logger.warning("backfill of %s .. %s failed (attempt %d of %d): %s", iso(since), iso(until),
                               attempt, FAILED_GAP_RETRIES, exc)
                if attempt == FAILED_GAP_RETRIES or self._quit.wait(FAILED_GAP_RETRY_SECONDS):
                    break
        self._not_filled(since, until, "the analytics query kept failing")

    def _not_filled(self, since: datetime, until: datetime, why: str) -> None:
        logger.error("backfill of %s .. %s on source %s not done (%s); run: manage.py backfill --since %s "
                     "--until %s", iso(since), iso(until), self.source, why, iso(since), iso(until))

    def _analytics(self) -> AnalyticsApi:
        if self._api is None:
            self._api = analytics_api(settings.GENESYS, stop=self._quit)
        return self._api

    def _catalog(self) -> Names:
        if self._names is None:
            self._names = catalog_names(settings.GENESYS)
        return self._names

    @staticmethod
    def _seconds_until(moment: datetime) -> float:
        return max(0.0, (moment - datetime.now(UTC)).total_seconds())
