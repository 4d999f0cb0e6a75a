"""Reads for the web pages and the JSON API: filters, keyset pagination, the live state and stream health.

Pagination is by keyset on (started_at, id), newest first, over the index `conversation_started_id`: a page
costs the same at row 50 and at row 1,000,000, and nothing ever counts the whole filtered set.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from conversations.events import ConversationState
from conversations.models import (
    Conversation,
    Event,
    HookDelivery,
    Participant,
    StreamCheckpoint,
    StreamConnection,
    WorkerHeartbeat,
)
from conversations.normalize_notifications import MEDIA_OF_LIST

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
EXPORT_CHUNK = 2000
# The live page: conversations in progress, and ended ones still in after-call work. Older ones are stale
# (an end or wrap-up that never came) and would otherwise stay on the wallboard forever.
LIVE_ACTIVE_WINDOW = timedelta(hours=12)
LIVE_ENDED_WINDOW = timedelta(minutes=30)
LIVE_MAX_ROWS = 1000
HEARTBEAT_STALE_AFTER = timedelta(seconds=30)
CHOICES_WINDOW = timedelta(days=7)
MAX_TIMELINE_EVENTS = 1000
EXPORT_FIELDS = (
    "conversation_id", "state", "media_type", "direction", "queue_id", "queue_name", "agent_id", "agent_name",
    "ani", "dnis", "wrapup_code", "wrapup_name", "wrapup_notes", "started_at", "ended_at", "wrapped_up_at",
)


class InvalidFilter(ValueError):
    """A query parameter that cannot be used; the message names it."""


# -- filters -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConversationFilter:
    state: str = ""
    media: str = ""
    direction: str = ""
    queue: str = ""
    agent: str = ""
    wrapup: str = ""
    q: str = ""  # conversation id, ANI or DNIS, exactly
    started_from: datetime | None = None
    started_before: datetime | None = None

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


TEXT_PARAMS = {"state": "state", "media": "media", "direction": "direction", "queue": "queue", "agent": "agent",
               "wrapup": "wrapup", "q": "q"}
STATES = frozenset(s.value for s in ConversationState)
# What the normalizers store: the media a notification's communication lists name, plus the one value only the
# analytics enum has; Genesys knows two directions (its "unknown" is stored as no value at all).
MEDIA_TYPES = frozenset(MEDIA_OF_LIST.values()) | {"internalmessage"}
DIRECTIONS = frozenset({"inbound", "outbound"})
# A value outside these sets can match no row: it is a typo or a stale link, so it is named, not silently empty.
ENUMERATED_PARAMS: dict[str, frozenset[str]] = {"state": STATES, "media": MEDIA_TYPES, "direction": DIRECTIONS}
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_filters(params: Mapping[str, str]) -> ConversationFilter:
    """Query parameters -> a filter. Dates are YYYY-MM-DD (whole days, `to` included) or ISO datetimes."""
    values: dict[str, Any] = {}
    for param, name in TEXT_PARAMS.items():
        value = (params.get(param) or "").strip()
        if len(value) > 200:
            raise InvalidFilter(f"{param} is too long")
        values[name] = value
    for param, allowed in ENUMERATED_PARAMS.items():
        if values[param] and values[param] not in allowed:
            raise InvalidFilter(f"{param} must be one of {', '.join(sorted(allowed))}")
    values["started_from"] = _moment(params.get("from"), "from", end_of_day=False)
    values["started_before"] = _moment(params.get("to"), "to", end_of_day=True)
    return ConversationFilter(**values)


def _moment(value: str | None, param: str, *, end_of_day: bool) -> datetime | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        day = parse_date(value) if _DAY.match(value) else None
        moment = None if day else parse_datetime(value)
    except ValueError:
        moment = day = None
    if day is not None:
        moment = datetime.combine(day + timedelta(days=1) if end_of_day else day, time.min)
    if moment is None:
        raise InvalidFilter(f"{param} must be a date (YYYY-MM-DD) or an ISO 8601 date and time")
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


def search_terms(q: str) -> set[str]:
    """ANI and DNIS are stored as `tel:+353...`; people type `+353...` or `353...`."""
    terms = {q}
    if q.startswith("tel:"):
        terms.add(q[4:])
    elif q.startswith("+"):
        terms.add("tel:" + q)
    elif q.isdigit():
        terms.update({"tel:+" + q, "tel:" + q, "+" + q})
    return terms


def conversations_matching(f: ConversationFilter) -> QuerySet[Conversation]:
    """Every condition is an equality or a range on an indexed column."""
    qs = Conversation.objects.all()
    exact = {"state": f.state, "media_type": f.media, "direction": f.direction, "queue_id": f.queue,
             "agent_id": f.agent, "wrapup_code": f.wrapup}
    qs = qs.filter(**{column: value for column, value in exact.items() if value})
    if f.started_from:
        qs = qs.filter(started_at__gte=f.started_from)
    if f.started_before:
        qs = qs.filter(started_at__lt=f.started_before)
    if f.q:
        terms = search_terms(f.q)
        qs = qs.filter(Q(conversation_id__in=terms) | Q(ani__in=terms) | Q(dnis__in=terms))
    return qs


# -- keyset pagination -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cursor:
    """The last row of a page: (started_at, id). started_at None is the tail of rows without a start."""

    started_at: datetime | None
    id: int

    def encode(self) -> str:
        moment = self.started_at.isoformat() if self.started_at else "-"
        return base64.urlsafe_b64encode(f"{moment}|{self.id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            moment, _, pk = raw.partition("|")
            started_at = None if moment == "-" else parse_datetime(moment)
            if moment != "-" and started_at is None:
                raise ValueError(moment)
            return cls(started_at, int(pk))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise InvalidFilter("cursor is not valid; start again from the first page") from None


@dataclass
class Page:
    items: list[Conversation] = field(default_factory=list)
    next_cursor: str | None = None


def page_size(value: str | None, *, default: int = DEFAULT_PAGE_SIZE) -> int:
    if not value:
        return default
    try:
        size = int(value)
    except ValueError:
        raise InvalidFilter("limit must be a number") from None
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidFilter(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    return size


def conversation_page(qs: QuerySet[Conversation], *, cursor: str | None, limit: int) -> Page:
    """Newest first. Rows with a start time, then (rarely) rows without one; limit + 1 rows tell if more."""
    after = Cursor.decode(cursor) if cursor else None
    rows: list[Conversation] = []
    if after is None or after.started_at is not None:
        started = qs.filter(started_at__isnull=False)
        if after is not None:
            # `started_at <= t` lets the database seek in the index; the exclude handles ties on t.
            started = started.filter(started_at__lte=after.started_at).exclude(
                started_at=after.started_at, id__gte=after.id
            )
        rows = list(started.order_by("-started_at", "-id")[: limit + 1])
    if len(rows) <= limit:
        unstarted = qs.filter(started_at__isnull=True)
        if after is not None and after.started_at is None:
            unstarted = unstarted.filter(id__lt=after.id)
        rows += list(unstarted.order_by("-id")[: limit + 1 - len(rows)])
    items = rows[:limit]
    more = len(rows) > limit
    return Page(items, Cursor(items[-1].started_at, items[-1].pk).encode() if more else None)


def export_rows(qs: QuerySet[Conversation]) -> Iterator[tuple[Any, ...]]:
    """The filtered set as tuples, newest first, fetched in chunks (a server-side cursor on PostgreSQL)."""
    return qs.order_by("-started_at", "-id").values_list(*EXPORT_FIELDS).iterator(chunk_size=EXPORT_CHUNK)


# -- one conversation --------------------------------------------------------------------------------------
def conversation_events(conversation: Conversation) -> QuerySet[Event]:
    return Event.objects.filter(conversation_id=conversation.conversation_id).order_by(
        "occurred_at", "id")[:MAX_TIMELINE_EVENTS]


def conversation_participants(conversation: Conversation) -> QuerySet[Participant]:
    return conversation.participants.order_by("connected_at", "id")


def conversation_hook_deliveries(conversation: Conversation) -> QuerySet[HookDelivery]:
    return conversation.hook_deliveries.order_by("created_at", "id")


# -- filter choices (recent values only: a distinct over a million rows is not a page load) -----------------
def filter_choices(*, now: datetime | None = None) -> dict[str, list[tuple[str, str]]]:
    since = (now or timezone.now()) - CHOICES_WINDOW
    recent = Conversation.objects.filter(started_at__gte=since)
    return {
        "queues": _pairs(recent, "queue_id", "queue_name"),
        "agents": _pairs(recent, "agent_id", "agent_name"),
        "wrapups": _pairs(recent, "wrapup_code", "wrapup_name"),
    }


def _pairs(qs: QuerySet[Conversation], key: str, label: str) -> list[tuple[str, str]]:
    pairs: dict[str, str] = {}
    for value, name in qs.exclude(**{key: ""}).values_list(key, label).distinct()[:500]:
        pairs[value] = pairs.get(value) or name or value
    return sorted(pairs.items(), key=lambda pair: pair[1].lower())


# -- the live page -----------------------------------------------------------------------------------------
def live_conversations(*, queue_id: str = "", now: datetime | None = None) -> list[Conversation]:
    """Conversations in progress and ended ones still in after-call work, newest first."""
    now = now or timezone.now()
    in_progress = Q(state=ConversationState.ACTIVE, last_event_at__gte=now - LIVE_ACTIVE_WINDOW)
    in_acw = Q(state=ConversationState.ENDED, ended_at__gte=now - LIVE_ENDED_WINDOW)
    qs = Conversation.objects.filter(in_progress | in_acw)
    if queue_id:
        qs = qs.filter(queue_id=queue_id)
    return list(qs.order_by("-started_at", "-id")[:LIVE_MAX_ROWS])


def today_counts(*, queue_id: str = "", now: datetime | None = None) -> dict[str, Any]:
    """Conversations started today (in TIME_ZONE), per state: a range on the started_at index."""
    start = timezone.localtime(now or timezone.now()).replace(hour=0, minute=0, second=0, microsecond=0)
    qs = Conversation.objects.filter(started_at__gte=start)
    if queue_id:
        qs = qs.filter(queue_id=queue_id)
    by_state = {state: 0 for state in sorted(STATES)}
    by_state.update(dict(qs.values_list("state").annotate(n=Count("id")).order_by()))
    return {"since": start.isoformat(), "by_state": by_state, "total": sum(by_state.values())}


def stream_health(*, now: datetime | None = None) -> dict[str, Any]:
    """What the sources and workers last said; every part may be empty (nothing has run yet)."""
    now = now or timezone.now()
    return {
        "checked_at": now.isoformat(),
        "workers": [_worker(beat, now) for beat in WorkerHeartbeat.objects.order_by("-beat_at")[:10]],
        "connections": [_connection(row) for row in _latest_connections()],
        "checkpoints": [
            {"source": c.source, "last_event_id": c.last_event_id, "events_committed": c.events_committed,
             "committed_at": _iso(c.updated_at)}
            for c in StreamCheckpoint.objects.order_by("source")
        ],
    }


def _latest_connections() -> list[StreamConnection]:
    sources = StreamConnection.objects.order_by().values_list("source", flat=True).distinct()
    latest = [StreamConnection.objects.filter(source=s).order_by("-connected_at").first() for s in sources[:10]]
    return [row for row in latest if row is not None]


def _worker(beat: WorkerHeartbeat, now: datetime) -> dict[str, Any]:
    return {
        "worker": beat.worker, "source": beat.source, "started_at": _iso(beat.started_at),
        "beat_at": _iso(beat.beat_at), "stale": now - beat.beat_at > HEARTBEAT_STALE_AFTER,
        "connected": beat.connected, "last_event_at": _iso(beat.last_event_at),
        "events_committed": beat.events_committed, "reconnects": beat.reconnects,
    }


def _connection(row: StreamConnection) -> dict[str, Any]:
    return {
        "source": row.source, "worker": row.worker, "connected_at": _iso(row.connected_at),
        "connected": row.disconnected_at is None, "disconnected_at": _iso(row.disconnected_at),
        "disconnect_reason": row.disconnect_reason, "last_heartbeat_at": _iso(row.last_heartbeat_at),
        "last_event_at": _iso(row.last_event_at), "events_received": row.events_received,
        "reconnects": StreamConnection.objects.filter(source=row.source, connected_at__gte=row.connected_at
                                                      - timedelta(days=1)).count() - 1,
    }


def events_received_since(moment: datetime) -> int:
    return Event.objects.filter(received_at__gte=moment).count()


def _iso(moment: datetime | date | None) -> str | None:
    return moment.isoformat() if moment else None
