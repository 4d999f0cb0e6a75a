"""The simulator's analytics conversation details query: `POST /api/v2/analytics/conversations/details/query`.

The contract is /work/shared/genesys/README.md section 5; shapes follow the platform SDK's models
AnalyticsConversation, AnalyticsParticipant, AnalyticsSession and AnalyticsConversationSegment (camelCase,
lowercase enums, ISO times with milliseconds and Z, absent rather than null when unknown).

Two parts:
- rendering: the latest SSE lifecycle payload of a conversation -> its analytics record
  (`analytics_conversation`). It reads the payload through the same `_Moment` as the Notifications rendering,
  so the three wires tell one story: the same start, end and wrap-up times, queue, media, direction, numbers,
  agent and wrap-up code.
- `AnalyticsStore`: every conversation the simulator generated (the Simulator records each lifecycle payload
  it appends, whether or not a socket or stream was there to hear it), the fault knobs and the stats; and
  `AnalyticsRoutes`, the endpoint on the SimulatorServer's aiohttp app.

Record shape, per participant (`purpose` customer | ivr | acd | agent) one session with segments:
    customer   inbound: interact (connected -> end);  outbound: dialing (start -> answer), then interact
    ivr        ivr (connected -> end)
    acd        interact (routed -> answered), queueId
    agent      interact (connected -> end), queueId; the agent who wraps up then has a wrapup segment
               (end -> wrap-up done; open while after-call work is pending) with wrapUpCode and wrapUpNote
    rejecting  alert (offered -> rejected), queueId, disconnectType endpoint; never interact
`conversationEnd` is when the customer left (the last agent's after-call work may run past it).

Query semantics: a conversation is returned when it overlaps the interval: it started before the interval's
end, and it is not over yet or its last segment ended at or after the interval's start (so a conversation that
ended before the interval but was wrapped up inside it is returned). The real platform selects by the day the
conversation started instead; the client filters to the window either way.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from conversations.genesys.simulator_notifications import _Moment as Moment
from conversations.genesys.simulator_notifications import is_lifecycle, session_id

logger = logging.getLogger(__name__)

DETAILS_QUERY_PATH = "/api/v2/analytics/conversations/details/query"
MAX_INTERVAL = timedelta(days=7)
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 25
MAX_CONVERSATIONS = 200_000
EVENT_ORDER = ("conversation:start", "conversation:update", "conversation:end", "conversation:wrapup")
ORDER_BY = ("conversationStart", "conversationEnd")
DIRECTIONS = ("asc", "desc")


# --- rendering: the latest lifecycle payload -> the analytics record --------------------------------------


def analytics_conversation(payload: dict[str, Any]) -> dict[str, Any]:
    """The AnalyticsConversation Genesys would answer for this conversation at this payload's moment."""
    moment = Moment(payload)
    record: dict[str, Any] = {
        "conversationId": moment.conversation_id, "conversationStart": moment.started_at,
    }
    if moment.ended_at:
        record["conversationEnd"] = moment.ended_at
    record["originatingDirection"] = moment.direction
    record["participants"] = [_participant(moment, raw) for raw in moment.participants]
    return record


def _participant(moment: Moment, raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"participantId": raw["participantId"]}
    if raw.get("name"):
        out["participantName"] = raw["name"]
    out["purpose"] = raw.get("purpose", "")
    if raw.get("userId"):
        out["userId"] = raw["userId"]
    out["sessions"] = [_session(moment, raw)]
    return out


def _session(moment: Moment, raw: dict[str, Any]) -> dict[str, Any]:
    session: dict[str, Any] = {
        "mediaType": moment.media,
        "sessionId": session_id(raw["participantId"]),
        "direction": moment.direction,
    }
    if moment.ani is not None:
        session["ani"] = moment.ani
    if moment.dnis is not None:
        session["dnis"] = moment.dnis
    session["segments"] = _segments(moment, raw)
    return session


def _segments(moment: Moment, raw: dict[str, Any]) -> list[dict[str, Any]]:
    purpose, connected, ended = raw.get("purpose"), raw.get("connectedTime"), raw.get("endTime")
    queue = {"queueId": raw["queueId"]} if raw.get("queueId") else {}
    if purpose == "agent" and not connected:
        rejected = "endpoint" if ended else None
        return [_segment("alert", _offered_at(moment), ended, disconnect=rejected, **queue)]
    if purpose == "customer" and (not connected or connected > moment.started_at):
        dialing = _segment("dialing", moment.started_at, connected or ended,
                           disconnect=None if connected or not ended else "endpoint")
        if not connected:
            return [dialing]
        return [dialing, _closing_segment(moment, raw, "interact", connected, ended, queue)]
    kind = "ivr" if purpose == "ivr" else "interact"
    segments = [_closing_segment(moment, raw, kind, connected or moment.started_at, ended, queue)]
    if purpose == "agent" and ended and moment.wraps_up(raw):
        segments.append(_wrapup_segment(moment, ended, queue))
    return segments


def _closing_segment(
    moment: Moment, raw: dict[str, Any], kind: str, start: str, end: str | None, queue: dict[str, str]
) -> dict[str, Any]:
    return _segment(kind, start, end, disconnect=moment.disconnect_type(raw) if end else None, **queue)


def _wrapup_segment(moment: Moment, ended: str, queue: dict[str, str]) -> dict[str, Any]:
    """After-call work from the agent's hang-up; closed, with the code, once the wrap-up is done."""
    if moment.wrapup is None:
        return _segment("wrapup", ended, None, **queue)
    segment = _segment("wrapup", ended, moment.at, **queue)
    segment["wrapUpCode"] = moment.wrapup.get("code")
    if moment.wrapup.get("notes"):
        segment["wrapUpNote"] = moment.wrapup["notes"]
    return segment


def _segment(
    kind: str, start: str, end: str | None, *, disconnect: str | None = None, **extra: str
) -> dict[str, Any]:
    segment: dict[str, Any] = {"segmentStart": start}
    if end:
        segment["segmentEnd"] = end
    segment["segmentType"] = kind
    segment.update(extra)
    if disconnect:
        segment["disconnectType"] = disconnect
    return segment


def _offered_at(moment: Moment) -> str:
    """An agent who rejected was offered the conversation once the ACD routed it."""
    acd = next((p for p in moment.participants if p.get("purpose") == "acd" and p.get("connectedTime")), None)
    return acd["connectedTime"] if acd else moment.started_at


# --- the query's view of a record --------------------------------------------------------------------------


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def last_activity(record: dict[str, Any]) -> datetime | None:
    """When the record's last segment ended; None while any segment is open (the conversation is not over)."""
    ends: list[datetime] = []
    for participant in record["participants"]:
        for session in participant["sessions"]:
            for segment in session["segments"]:
                if "segmentEnd" not in segment:
                    return None
                ends.append(parse_time(segment["segmentEnd"]))
    return max(ends, default=parse_time(record["conversationStart"]))


def overlaps(record: dict[str, Any], start: datetime, end: datetime) -> bool:
    if parse_time(record["conversationStart"]) >= end:
        return False
    last = last_activity(record)
    return last is None or last >= start


def _sort_key(record: dict[str, Any], order_by: str) -> tuple[str, str]:
    return record.get(order_by) or "9999", record["conversationId"]


# --- the store -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class Query:
    start: datetime
    end: datetime
    page_size: int
    page_number: int
    order_by: str = "conversationStart"
    descending: bool = False


@dataclass
class AnalyticsStats:
    queries: list[Any] = field(default_factory=list)  # request bodies, in order
    statuses: list[int] = field(default_factory=list)
    conversations_sent: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, list) else value for name, value in vars(self).items()}


@dataclass
class _Entry:
    payload: dict[str, Any]
    rank: tuple[datetime, int]
    rendered: dict[str, Any] | None = None


class AnalyticsStore:
    """Every generated conversation's latest payload, rendered on demand; knobs and stats. Thread-safe."""

    def __init__(self, *, max_conversations: int = MAX_CONVERSATIONS) -> None:
        self.max_interval = MAX_INTERVAL
        self.max_page_size = MAX_PAGE_SIZE
        # Pages shift while data arrives: each page after the first repeats this many rows of the one before.
        self.page_overlap = 0
        self._max = max_conversations
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._failures: deque[Failure] = deque()
        self._stats = AnalyticsStats()

    def record(self, payload: Any) -> None:
        """Keep a lifecycle payload if it is its conversation's newest (not a duplicate, not a late one)."""
        if not is_lifecycle(payload) or not isinstance(payload.get("timestamp"), str):
            return
        try:
            rank = (parse_time(payload["timestamp"]), EVENT_ORDER.index(payload["eventType"]))
        except ValueError:
            return  # not a moment the analytics record can say anything about
        with self._lock:
            entry = self._entries.get(payload["conversationId"])
            if entry is not None and entry.rank >= rank:
                return
            self._entries[payload["conversationId"]] = _Entry(payload, rank)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def conversations(self) -> list[dict[str, Any]]:
        """Every record as the API would show it now (unreadable payloads left out)."""
        with self._lock:
            entries = list(self._entries.values())
        records = []
        for entry in entries:
            if entry.rendered is None:
                entry.rendered = self._render(entry.payload)
            if entry.rendered:
                records.append(entry.rendered)
        return records

    def _render(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            return analytics_conversation(payload)
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("simulator analytics: conversation %s not rendered (%s: %s)",
                           payload.get("conversationId"), type(exc).__name__, exc)
            return {}

    def answer(self, query: Query) -> dict[str, Any]:
        """A page of the records overlapping the interval (no `conversations` key when empty, as Genesys)."""
        matching = sorted((r for r in self.conversations() if overlaps(r, query.start, query.end)),
                          key=lambda r: _sort_key(r, query.order_by), reverse=query.descending)
        first = (query.page_number - 1) * query.page_size
        if query.page_number > 1:
            first = max(0, first - self.page_overlap)
        page = matching[first : query.page_number * query.page_size]
        self.record_stats(lambda s: setattr(s, "conversations_sent", s.conversations_sent + len(page)))
        body: dict[str, Any] = {"totalHits": len(matching)}
        if page:
            body["conversations"] = page
        return body

    # --- knobs ---------------------------------------------------------------------------------------------

    def fail_next(self, status: int, *, count: int = 1, retry_after: int | None = None) -> None:
        """The next `count` queries get `status` with a Genesys error body (429: with Retry-After)."""
        with self._lock:
            self._failures.extend(Failure(status, retry_after) for _ in range(count))

    def take_failure(self) -> Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    # --- stats ---------------------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """A copy: queries (request bodies), statuses, conversations_sent."""
        with self._lock:
            return self._stats.snapshot()

    def record_stats(self, update: Callable[[AnalyticsStats], None]) -> None:
        with self._lock:
            update(self._stats)


# --- the route ----------------------------------------------------------------------------------------------


class QueryError(ValueError):
    """The query body is not one Genesys accepts (answered 400 with this message)."""


class AnalyticsRoutes:
    """`POST /api/v2/analytics/conversations/details/query` on the simulator's app."""

    def __init__(
        self,
        store: AnalyticsStore,
        *,
        authorized: Callable[[web.Request], bool],
        error: Callable[..., web.Response],
    ) -> None:
        self.store = store
        self._authorized = authorized
        self._error = error

    def mount(self, app: web.Application) -> None:
        app.router.add_post(DETAILS_QUERY_PATH, self.query)

    async def query(self, request: web.Request) -> web.Response:
        raw = await request.read()
        response = self._answer(request, raw)
        self.store.record_stats(lambda stats: _count_query(stats, _json_or_none(raw), response.status))
        return response

    def _answer(self, request: web.Request, raw: bytes) -> web.Response:
        failure = self.store.take_failure()
        if failure is not None:
            logger.info("simulator answering an analytics query with %d (fail_next)", failure.status)
            return self._error(failure.status, retry_after=failure.retry_after,
                               message=_message(failure.status))
        if not self._authorized(request):
            return self._error(401)
        try:
            query = parse_query(_json_or_none(raw), store=self.store)
        except QueryError as exc:
            return self._error(400, message=str(exc))
        body = orjson.dumps(self.store.answer(query))
        return web.Response(status=200, body=body, content_type="application/json")


def _count_query(stats: AnalyticsStats, body: Any, status: int) -> None:
    stats.queries.append(body)
    stats.statuses.append(status)


def _message(status: int) -> str | None:
    if status == 403:
        return "You are missing the following permission(s): analytics:conversationDetail:view"
    return None


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        return None


def parse_query(body: Any, *, store: AnalyticsStore) -> Query:
    """Validate a ConversationQuery the way the platform does; raises QueryError."""
    if not isinstance(body, dict):
        raise QueryError("The request body must be a JSON ConversationQuery object")
    start, end = _interval(body.get("interval"), limit=store.max_interval)
    page_size, page_number = _paging(body.get("paging"), limit=store.max_page_size)
    order_by = body.get("orderBy", "conversationStart")
    order = str(body.get("order", "asc")).lower()
    if order_by not in ORDER_BY or order not in DIRECTIONS:
        raise QueryError(f"orderBy must be one of {', '.join(ORDER_BY)} and order asc or desc")
    return Query(start, end, page_size, page_number, order_by=order_by, descending=order == "desc")


def _interval(value: Any, *, limit: timedelta) -> tuple[datetime, datetime]:
    if not isinstance(value, str) or value.count("/") != 1:
        raise QueryError("interval is required, as START/END in ISO-8601")
    try:
        start, end = (parse_time(part) for part in value.split("/"))
    except ValueError:
        raise QueryError(f"interval {value!r} is not START/END in ISO-8601") from None
    if end <= start:
        raise QueryError(f"interval {value!r} ends before it starts")
    if end - start > limit:
        raise QueryError(f"interval {value!r} spans more than {limit.days} days; split the query")
    return start, end


def _paging(value: Any, *, limit: int) -> tuple[int, int]:
    paging = value if isinstance(value, dict) else {}
    size, number = paging.get("pageSize", DEFAULT_PAGE_SIZE), paging.get("pageNumber", 1)
    if not isinstance(size, int) or not isinstance(number, int) or not 1 <= size <= limit or number < 1:
        raise QueryError(f"paging.pageSize must be 1..{limit} and paging.pageNumber at least 1")
    return size, number
