"""The Notifications API source: channels and subscriptions over REST, live messages over WebSockets.

What a real Genesys Cloud org offers for live conversations (../shared/genesys/README.md, section 4):

* REST (blocking `requests`, the same TokenProvider and error classes as the SSE source): create a channel,
  HEAD it, PUT/POST/GET its subscriptions (always `?ignoreErrors=true`; every Rejected topic is logged with its
  missing permissions), list the queues to watch.
* One WebSocket per channel, read in an asyncio loop that runs in its own thread. Heartbeats are tracked; after
  `idle_timeout` of silence the client sends {"message":"ping"} and reconnects when no pong comes.
  `v2.system.socket_closing`: the new socket is opened first, the old one drained, then closed. A drop or a
  close: reconnect to the same channel while HEAD says it lives, else create a channel and subscribe its whole
  topic list again. Channels are re-subscribed before their 24 h end. Eviction (`no_longer_subscribed`) and
  token revocation get a new channel (and a new token). Every failure waits a capped backoff with jitter, and
  never less than the Retry-After Genesys gave (even above the backoff's cap: what a wait loses, the gap
  backfill fetches again), whichever REST call
  (queue listing, channel, HEAD, subscriptions, wrap-up codes) got it.
* Topics are spread over channels by conversations.genesys.topics.TopicBudget; each discovered conversation's
  detail-event topics are subscribed, and dropped once it is wrapped up.

The source knows the wire and nothing about the database: `events()` yields typed events and rejects (from
conversations.normalize_notifications) in the calling thread, and connection history goes to a callback.
There is no resume cursor: while a socket is down, Genesys's events are lost (backfill fills the gaps).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from conversations.events import EventKind, Reject, TypedEvent
from conversations.genesys import rest
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff, parse_retry_after
from conversations.genesys.errors import FatalSourceError, TransientError, short_reason
from conversations.genesys.topics import (
    DETAIL_EVENT_TYPES,
    TopicBudget,
    TopicLimitError,
    queue_topic,
    user_topic,
)
from conversations.normalize import parse_time
from conversations.normalize_notifications import (
    METADATA_TOPIC,
    SOURCE,
    Names,
    normalize_message,
    parse_message,
)

logger = logging.getLogger(__name__)

CHANNELS_PATH = "/api/v2/notifications/channels"
QUEUES_PATH = "/api/v2/routing/queues"
WRAPUP_CODES_PATH = "/api/v2/routing/wrapupcodes"
PING = '{"message":"ping"}'
QUEUE_PAGE_SIZE = 100
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SYSTEM_PREFIX = "v2.system."
# Seconds our close handshake waits for the server's answer before the TCP connection is dropped anyway.
CLOSE_TIMEOUT = 2.0
# How often the loop looks at `stop`, and how long the reader waits for the loop to hand over what it read.
STOP_POLL_SECONDS = 0.05
STOP_GRACE = 2.0
FINISH_TIMEOUT = 5.0

Item = TypedEvent | Reject


# --- connection history (shared with the SSE source) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """Everything known about one connection (an SSE stream or a Notifications socket) at one moment.

    Each report replaces the previous one for the same connection_id, so a writer may simply upsert it.
    """

    source: str
    connection_id: str
    channel_id: str
    connected_at: datetime
    last_heartbeat_at: datetime | None = None
    last_event_at: datetime | None = None
    events_received: int = 0
    disconnected_at: datetime | None = None
    disconnect_reason: str = ""


ConnectionListener = Callable[[ConnectionReport], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


class ConnectionTracker:
    """One connection's history, reported when it opens, at most every `report_interval` seconds while it
    lives (heartbeats and events), and when it closes."""

    def __init__(
        self,
        *,
        source: str,
        listener: ConnectionListener | None,
        channel_id: str = "",
        report_interval: float = 5.0,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._listener = listener
        self._now = now
        self._interval = timedelta(seconds=report_interval)
        self.report = ConnectionReport(
            source=source, connection_id=uuid.uuid4().hex, channel_id=channel_id, connected_at=now()
        )
        self._reported_at = self.report.connected_at
        self._unreported = 0  # events since the report was last rebuilt
        self._last_event_at: datetime | None = None
        self._emit()

    @property
    def connection_id(self) -> str:
        return self.report.connection_id

    @property
    def closed(self) -> bool:
        return self.report.disconnected_at is not None

    def heartbeat(self) -> None:
        self._update(last_heartbeat_at=self._now())

    def events(self, count: int = 1) -> None:
        """Counted in plain attributes (this runs for every message); the report is rebuilt when it is sent."""
        if self.closed:
            return
        now = self._now()
        self._unreported += count
        self._last_event_at = now
        if now - self._reported_at >= self._interval:
            self._emit()

    def close(self, reason: str) -> None:
        """The connection ended; only the first reason counts."""
        if self.closed:
            return
        self._take_counts()
        self.report = _replace(self.report, disconnected_at=self._now(), disconnect_reason=reason[:2000])
        self._emit()

    def _update(self, **changes: Any) -> None:
        if self.closed:
            return
        self.report = _replace(self.report, **changes)
        if self._now() - self._reported_at >= self._interval:
            self._emit()

    def _take_counts(self) -> None:
        if self._unreported:
            self.report = _replace(self.report, last_event_at=self._last_event_at,
                                   events_received=self.report.events_received + self._unreported)
            self._unreported = 0

    def _emit(self) -> None:
        self._take_counts()
        self._reported_at = self._now()
        if self._listener is not None:
            self._listener(self.report)


def _replace(report: ConnectionReport, **changes: Any) -> ConnectionReport:
    values = {name: getattr(report, name) for name in ConnectionReport.__slots__}
    values.update(changes)
    return ConnectionReport(**values)


# --- the REST side ------------------------------------------------------------------------------------------


class ChannelGone(TransientError):
    """The channel no longer exists (expired, evicted, revoked): create a new one."""


@dataclass(frozen=True, slots=True)
class Channel:
    id: str
    connect_uri: str
    expires: datetime | None


@dataclass(frozen=True, slots=True)
class TopicState:
    id: str
    state: str
    missing_permissions: tuple[str, ...] = ()
    reason: str = ""

    @property
    def rejected(self) -> bool:
        return self.state.lower() == "rejected"


@dataclass(frozen=True, slots=True)
class QueueRef:
    id: str
    name: str


class NotificationsApi(rest.Client):
    """Blocking REST calls of the Notifications API; errors classified as the SSE source classifies them."""

    def __init__(
        self,
        *,
        api_url: str,
        tokens: TokenProvider,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (10.0, 30.0),
    ) -> None:
        super().__init__(api_url=api_url, tokens=tokens, session=session, timeout=timeout)

    # Channels

    def create_channel(self) -> Channel:
        body = self._json(self._send("POST", CHANNELS_PATH, what="creating a notification channel"))
        try:
            return Channel(id=str(body["id"]), connect_uri=str(body["connectUri"]), expires=_expires(body))
        except (KeyError, TypeError) as exc:
            raise TransientError(f"{CHANNELS_PATH} answered without a channel id or connectUri ({exc!r})") from None

    def channel_exists(self, channel_id: str) -> bool:
        response = self._send("HEAD", f"{CHANNELS_PATH}/{channel_id}", what="checking a channel", allow_404=True)
        return response.status_code != 404

    # Subscriptions

    def replace_subscriptions(self, channel_id: str, topics: Sequence[str]) -> list[TopicState]:
        return self._subscribe("PUT", channel_id, topics)

    def add_subscriptions(self, channel_id: str, topics: Sequence[str]) -> list[TopicState]:
        return self._subscribe("POST", channel_id, topics)

    def subscriptions(self, channel_id: str) -> list[str]:
        response = self._send("GET", self._subscriptions_path(channel_id), what="listing subscriptions",
                              allow_404=True)
        self._raise_if_gone(response, channel_id)
        return [str(e["id"]) for e in self._entities(response) if isinstance(e, dict) and e.get("id")]

    def _subscribe(self, method: str, channel_id: str, topics: Sequence[str]) -> list[TopicState]:
        response = self._send(
            method, self._subscriptions_path(channel_id), params={"ignoreErrors": "true"},
            json=[{"id": topic} for topic in topics], what="subscribing to topics", allow_404=True,
        )
        self._raise_if_gone(response, channel_id)
        states = [_topic_state(e) for e in self._entities(response) if isinstance(e, dict) and e.get("id")]
        for state in states:
            if state.rejected:
                logger.warning(
                    "notifications: topic %s rejected on channel %s: %s (missing permissions: %s)",
                    state.id, channel_id, state.reason or "no reason given",
                    ", ".join(state.missing_permissions) or "none listed",
                )
        return states

    def _subscriptions_path(self, channel_id: str) -> str:
        return f"{CHANNELS_PATH}/{channel_id}/subscriptions"

    def _raise_if_gone(self, response: requests.Response, channel_id: str) -> None:
        if response.status_code == 404:
            raise ChannelGone(f"channel {channel_id} no longer exists (404)")

    # Catalog

    def queues(self, *, page_size: int = QUEUE_PAGE_SIZE) -> list[QueueRef]:
        """Every routing queue, page by page."""
        found: list[QueueRef] = []
        page = 1
        while True:
            response = self._send("GET", QUEUES_PATH, params={"pageSize": page_size, "pageNumber": page},
                                  what="listing routing queues")
            body = self._json(response)
            found += [QueueRef(str(e["id"]), str(e.get("name") or "")) for e in self._entities(response)
                      if isinstance(e, dict) and e.get("id")]
            page_count = body.get("pageCount") if isinstance(body, dict) else None
            if not isinstance(page_count, int) or page >= page_count:
                return found
            page += 1

    def wrapup_code_name(self, code_id: str) -> str | None:
        response = self._send("GET", f"{WRAPUP_CODES_PATH}/{code_id}", what="reading a wrap-up code",
                              allow_404=True)
        if response.status_code == 404:
            return None
        name = self._json(response).get("name")
        return str(name) if name else None

    # The one way every call goes

    def _send(
        self, method: str, path: str, *, what: str, params: dict[str, Any] | None = None, json: Any = None,
        allow_404: bool = False,
    ) -> requests.Response:
        """A response with status 2xx (or 404 when allowed); a 401 gets one new token and one more try."""
        label = f"{what} ({method} {path})"
        response = rest.renewing_once(lambda: self.send(method, path, params=params, json=json),
                                      tokens=self.tokens, what=label)
        return rest.checked(
            response, what=label,
            forbidden="the OAuth client's role lacks a permission (see the README: permissions per topic family)",
            accept=lambda status: 200 <= status < 300 or (status == 404 and allow_404),
        )

    def _json(self, response: requests.Response) -> dict[str, Any]:
        return rest.json_object(response, label=f"{response.request.method} {response.url}")

    def _entities(self, response: requests.Response) -> list[Any]:
        entities = self._json(response).get("entities")
        return entities if isinstance(entities, list) else []


def _expires(body: dict[str, Any]) -> datetime | None:
    try:
        return parse_time(body.get("expires"), field="expires")
    except ValueError:
        return None


def _topic_state(entity: dict[str, Any]) -> TopicState:
    missing = entity.get("missingPermissions")
    return TopicState(
        id=str(entity["id"]),
        state=str(entity.get("state") or "Permitted"),
        missing_permissions=tuple(str(p) for p in missing) if isinstance(missing, list) else (),
        reason=str(entity.get("rejectionReason") or ""),
    )


class CatalogNames:
    """Names for the normalizer: queues from the listing, wrap-up codes read once each (in the reader thread)."""

    def __init__(self, api: NotificationsApi, queues: Sequence[QueueRef] = ()) -> None:
        self._api = api
        self._queues = {q.id: q.name for q in queues if q.name}
        self._wrapups: dict[str, str | None] = {}
        # time.monotonic() before which no code is looked up: Genesys's Retry-After. A skipped lookup costs
        # only a name (the code is stored), so the server's delay is honoured in full, never capped.
        self._quiet_until = 0.0

    def queue_name(self, queue_id: str) -> str | None:
        return self._queues.get(queue_id)

    def wrapup_name(self, code_id: str) -> str | None:
        if code_id not in self._wrapups:
            if time.monotonic() < self._quiet_until:
                return None
            self._look_up(code_id)
        return self._wrapups.get(code_id)

    def _look_up(self, code_id: str) -> None:
        try:
            self._wrapups[code_id] = self._api.wrapup_code_name(code_id)
        except TransientError as exc:  # not cached: asked again with a later event that carries it
            self._quiet_until = time.monotonic() + (exc.retry_after or 0.0)
            logger.warning("notifications: wrap-up code %s not resolved for now: %s%s", code_id, exc,
                           f"; no lookups for {exc.retry_after:g}s (Retry-After)" if exc.retry_after else "")
        except FatalSourceError as exc:
            logger.warning("notifications: wrap-up code names unavailable (%s); storing codes only", exc)
            self._wrapups[code_id] = None


# --- the source -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotificationsConfig:
    queue_ids: tuple[str, ...] = ()  # empty: every queue the listing returns
    user_ids: tuple[str, ...] = ()
    idle_timeout: float = 70.0  # seconds of silence before a ping
    pong_timeout: float = 10.0  # seconds a ping waits for its pong before reconnecting
    # Subscriptions follow the topic budget at most this often per channel: new topics are POSTed; topics that
    # went (wrapped-up conversations) are dropped by a PUT of the whole list at most every `prune_interval`, so a
    # busy channel stays far below the API's rate limit (about 300 requests a minute per token).
    sync_interval: float = 2.0
    prune_interval: float = 60.0
    extend_margin: float = 3600.0  # re-subscribe (which extends a channel) this long before it expires
    channel_ttl: float = 86400.0
    max_topics: int = 1000
    max_channels: int = 20
    ended_grace: float = 1800.0  # an ended conversation's detail topics go after this if no wrap-up comes
    detail_types: tuple[str, ...] = DETAIL_EVENT_TYPES
    handover_grace: float = 5.0  # after socket_closing, how long the old socket is drained before we close it
    stable_after: float = 30.0  # a socket healthy this long resets the backoff
    open_timeout: float = 10.0
    report_interval: float = 5.0  # connection history: at most one report this often while a socket lives
    handoff_size: int = 1000


@dataclass
class NotificationsStats:
    """Counters; `connects`, `reconnects`, `messages` and `last_connected_at` are what the heartbeat reads."""

    connects: int = 0  # sockets opened
    reconnects: int = 0  # failures after which a socket or channel was set up again
    messages: int = 0  # every message received, heartbeats and pongs included
    events: int = 0  # messages handed to the normalizer
    last_connected_at: datetime | None = None
    last_error: str | None = None
    channels_created: int = 0
    handovers: int = 0
    pings_sent: int = 0
    idle_reconnects: int = 0
    evictions: int = 0
    tokens_revoked: int = 0
    channel_extensions: int = 0
    subscription_puts: int = 0
    subscription_posts: int = 0
    rejected_topics: int = 0


@dataclass(frozen=True, slots=True)
class _Received:
    raw: str
    message: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Finished:
    error: BaseException | None = None


class NotificationsSource:
    name = SOURCE
    last_event_id: str | None = None  # no resume cursor on this wire

    def __init__(
        self,
        *,
        api: NotificationsApi,
        config: NotificationsConfig | None = None,
        backoff: Callable[[], Backoff] | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], datetime] = utc_now,
        on_connection: ConnectionListener | None = None,
    ) -> None:
        self.api = api
        self.config = config or NotificationsConfig()
        self.stop = stop or threading.Event()
        self.stats = NotificationsStats()
        self.clock = clock
        self.on_connection = on_connection
        self.budget: TopicBudget | None = None
        self.names: Names = CatalogNames(api)
        self.new_backoff: Callable[[], Backoff] = backoff or Backoff
        self._handoff: queue.Queue[_Received | _Finished] = queue.Queue(maxsize=self.config.handoff_size)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def events(self) -> Iterator[Item]:
        """Typed events and rejects as messages arrive, reconnecting forever; return once `stop` is set.

        Raises FatalSourceError when Genesys refuses the client, the token or a permission it cannot do without.
        """
        self._start()
        stopping_since: float | None = None
        while True:
            try:
                entry = self._handoff.get(timeout=STOP_POLL_SECONDS)
            except queue.Empty:
                if self.stop.is_set():
                    # What the loop still holds is handed over before it finishes; don't wait forever for it.
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > FINISH_TIMEOUT:
                        return
                continue
            if isinstance(entry, _Finished):
                if entry.error is not None:
                    raise entry.error
                return
            yield from self._normalize(entry)

    def close(self) -> None:
        """Stop reading and wait (briefly) for the loop thread to close its sockets."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=FINISH_TIMEOUT)
        self.api.close()

    def wait_ready(self, timeout: float) -> bool:
        """True once every channel has been subscribed and has had a socket open (tests and the demo use it)."""
        return self._ready.wait(timeout)

    # The reader thread

    def _normalize(self, entry: _Received) -> list[Item]:
        if entry.message is None:
            return [Reject(source=SOURCE, raw=entry.raw, error="not a JSON object with a topicName")]
        items = normalize_message(entry.message, raw=entry.raw, names=self.names)
        for item in items:
            if isinstance(item, TypedEvent):
                self._follow(item)
        return items

    def _follow(self, event: TypedEvent) -> None:
        """Subscribe a discovered conversation's detail topics; let them go once it is wrapped up."""
        budget = self.budget
        if budget is None or event.kind is EventKind.UNKNOWN:
            return
        if event.kind is EventKind.WRAPUP:
            budget.finish(event.conversation_id)
            return
        budget.follow(event.conversation_id)
        if event.kind is EventKind.END:
            budget.ended(event.conversation_id)

    # The loop thread

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="notifications-loop", daemon=True)
            self._thread.start()

    def _run_loop(self) -> None:
        error: BaseException | None = None
        try:
            asyncio.run(Supervisor(self).run())
        except BaseException as exc:  # handed to the reader, which raises it in the pipeline's thread
            error = exc
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        """Tell the reader the loop is done; after a stop, a reader that stopped reading is not waited for long."""
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            try:
                self._handoff.put(_Finished(error), timeout=STOP_POLL_SECONDS)
                return
            except queue.Full:
                if self.stop.is_set() and time.monotonic() > deadline:
                    logger.warning("notifications: the reader stopped taking messages; %d not handed over",
                                   self._handoff.qsize())
                    return

    async def deliver(self, raw: str, message: dict[str, Any] | None) -> None:
        """Hand a message to the reader thread; a full hand-off pauses this socket's reading (backpressure)."""
        entry = _Received(raw, message)
        while True:
            try:
                self._handoff.put_nowait(entry)
                self.stats.events += 1
                return
            except queue.Full:
                await asyncio.sleep(0.005)

    def mark_ready(self) -> None:
        self._ready.set()


class Supervisor:
    """Runs in the loop thread: plans the topics, keeps one ChannelSession per budget slot, stops them all."""

    def __init__(self, source: NotificationsSource) -> None:
        self.source = source
        self.config = source.config
        self.sessions: list[ChannelSession] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        try:
            self.source.budget = await self._plan()
            if self.source.budget is None:
                return
            while not self.source.stop.is_set():
                self._spawn_missing()
                if all(session.live for session in self.sessions):
                    self.source.mark_ready()
                self._raise_failures()
                self._expire_ended()
                await asyncio.sleep(STOP_POLL_SECONDS)
        finally:
            await self._stop_all()

    async def _plan(self) -> TopicBudget | None:
        """Queue and user topics, retried with backoff while the platform fails transiently."""
        backoff = self.source.new_backoff()
        while not self.source.stop.is_set():
            try:
                topics = await asyncio.to_thread(self._base_topics)
            except TransientError as exc:
                delay = backoff.next_delay(exc.retry_after)
                logger.warning("notifications: cannot list what to watch (%s); %sretrying in %.2fs", exc,
                               asked(exc.retry_after), delay)
                await sleep_unless_stopped(self.source.stop, delay)
                continue
            try:
                return TopicBudget(topics, max_topics=self.config.max_topics, max_channels=self.config.max_channels,
                                   detail_types=self.config.detail_types, ended_grace=self.config.ended_grace)
            except TopicLimitError as exc:
                raise FatalSourceError(str(exc)) from None
        return None

    def _base_topics(self) -> list[str]:
        queues = self._queues()
        self.source.names = CatalogNames(self.source.api, queues)
        queue_ids = list(self.config.queue_ids) or [q.id for q in queues]
        topics = [queue_topic(q) for q in queue_ids] + [user_topic(u) for u in self.config.user_ids]
        if not topics:
            raise FatalSourceError(
                "nothing to watch: the org has no routing queues visible to this OAuth client and GENESYS_QUEUE_IDS "
                "and GENESYS_USER_IDS are empty"
            )
        logger.info("notifications: watching %d queues and %d users (%d topics)",
                    len(queue_ids), len(self.config.user_ids), len(topics))
        return topics

    def _queues(self) -> list[QueueRef]:
        """The org's queues; with GENESYS_QUEUE_IDS set, only their names are wanted, so a refusal is not fatal."""
        try:
            queues = self.source.api.queues()
        except FatalSourceError as exc:
            if not self.config.queue_ids:
                raise
            logger.warning("notifications: queue names unavailable (%s); watching GENESYS_QUEUE_IDS as given", exc)
            return []
        if self.config.queue_ids:
            known = {q.id for q in queues}
            unknown = [q for q in self.config.queue_ids if q not in known]
            if unknown:
                logger.warning("notifications: GENESYS_QUEUE_IDS has ids the queue listing does not: %s",
                               ", ".join(unknown))
        return queues

    def _spawn_missing(self) -> None:
        budget = self.source.budget
        assert budget is not None
        while len(self.sessions) < budget.slot_count:
            session = ChannelSession(self.source, slot=len(self.sessions))
            self.sessions.append(session)
            self.tasks.append(asyncio.create_task(session.run(), name=f"notifications-slot-{session.slot}"))

    def _raise_failures(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def _expire_ended(self) -> None:
        budget = self.source.budget
        assert budget is not None
        for conversation_id in budget.expire_ended():
            logger.info("notifications: conversation %s ended %.0fs ago without a wrap-up; its detail topics go",
                        conversation_id, budget.ended_grace)

    async def _stop_all(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=STOP_GRACE)
            if stuck:
                logger.warning("notifications: %d channel tasks did not stop within %gs", len(stuck), STOP_GRACE)
        await asyncio.gather(*(session.close_all("worker stopping") for session in self.sessions))


def asked(retry_after: float | None) -> str:
    """What a log line says of the server's Retry-After ("" without one), ending with "; "."""
    if retry_after is None:
        return ""
    return f"Genesys asked to wait {retry_after:g}s (Retry-After); "


async def sleep_unless_stopped(stop: threading.Event, seconds: float) -> None:
    """Sleep `seconds`, waking early (within STOP_POLL_SECONDS) once `stop` is set."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not stop.is_set():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, STOP_POLL_SECONDS))


@dataclass
class Socket:
    """One WebSocket on a channel, with its connection history."""

    ws: ClientConnection
    tracker: ConnectionTracker
    opened: float  # loop time
    healthy: bool = False


@dataclass
class Ending:
    """Why a socket's reading ended, and what comes next."""

    reason: str
    new_channel: bool = False  # the channel is gone for sure: skip HEAD
    handover: Socket | None = None  # socket_closing: read this already-open socket next
    retry_after: float | None = None  # seconds the server asked us to wait before calling it again


class ChannelSession:
    """One budget slot: its channel (replaced when it dies), its socket, its subscriptions."""

    def __init__(self, source: NotificationsSource, *, slot: int) -> None:
        self.source = source
        self.slot = slot
        self.config = source.config
        self.stats = source.stats
        self.api = source.api
        self.channel: Channel | None = None
        self.synced_version = -1  # the budget version the channel's subscriptions match; -1: none yet
        self.subscribed: set[str] = set()
        self.rejected: set[str] = set()
        self.sockets: list[Socket] = []
        self.drains: set[asyncio.Task[None]] = set()  # old sockets being drained after a handover
        self.backoff = source.new_backoff()
        self.pruned_at = 0.0  # loop time of the last PUT
        # Loop time before which the session makes no more REST calls: the last Retry-After it was given.
        self.quiet_until = 0.0
        # Channel replacement and subscription calls never interleave (the reader and maintenance both do them).
        self.lock = asyncio.Lock()

    @property
    def live(self) -> bool:
        """Subscribed, with a socket open."""
        return self.synced_version >= 0 and bool(self.sockets)

    # The session's life

    async def run(self) -> None:
        maintenance = asyncio.create_task(self._maintain(), name=f"notifications-maintain-{self.slot}")
        try:
            while not self.source.stop.is_set():
                try:
                    ending = await self._connect_and_read()
                except TransientError as exc:
                    ending = Ending(reason=str(exc), new_channel=isinstance(exc, ChannelGone),
                                    retry_after=exc.retry_after)
                await self._after(ending)
        finally:
            maintenance.cancel()
            await asyncio.gather(maintenance, return_exceptions=True)

    async def _connect_and_read(self) -> Ending:
        await self._ensure_channel()
        socket = await self._open_socket()
        try:
            await self._subscribe_if_new()
        except BaseException as exc:
            await self._finish_socket(socket, f"subscribing failed: {exc}")
            raise
        while True:
            ending = await self._read(socket)
            if ending.handover is None:
                return ending
            socket = ending.handover

    async def _after(self, ending: Ending) -> None:
        """Every end of a socket that is not a handover is a failure: wait a backoff, never less than what is
        left of a Retry-After, then go on."""
        if ending.new_channel:
            self.channel = None
        self.stats.reconnects += 1
        self.stats.last_error = ending.reason
        delay = self.backoff.next_delay(self._quiet_for(ending.retry_after))
        channel = "new channel" if self.channel is None else f"channel {self.channel.id}"
        logger.warning("notifications: slot %d: %s; %sreconnecting in %.2fs (%s, reconnect #%d)", self.slot,
                       ending.reason, asked(ending.retry_after), delay, channel,
                       self.stats.reconnects)
        await sleep_unless_stopped(self.source.stop, delay)

    def _quiet_for(self, retry_after: float | None) -> float:
        """Seconds the session still leaves Genesys alone; a Retry-After adds some (a floor, even above the
        backoff's cap, as everywhere). Reconnects and subscription upkeep both wait them out, whichever of the
        two was given it."""
        now = asyncio.get_running_loop().time()
        if retry_after is not None:
            self.quiet_until = max(self.quiet_until, now + retry_after)
        return max(0.0, self.quiet_until - now)

    # Channels and subscriptions

    async def _ensure_channel(self) -> None:
        """Keep the channel while HEAD says it lives; else create one (subscribed from scratch)."""
        async with self.lock:
            if self.channel is not None:
                if await asyncio.to_thread(self.api.channel_exists, self.channel.id):
                    return
                logger.info("notifications: slot %d: channel %s is gone (HEAD 404); creating a new one",
                            self.slot, self.channel.id)
            channel = await asyncio.to_thread(self.api.create_channel)
            self.channel, self.synced_version, self.subscribed = channel, -1, set()
            self.stats.channels_created += 1
            logger.info("notifications: slot %d: channel %s created (expires %s)", self.slot, channel.id,
                        channel.expires)

    async def _subscribe_if_new(self) -> None:
        if self.synced_version < 0:
            await self._sync(replace=True)

    async def _sync(self, *, replace: bool = False) -> None:
        """Bring the channel's subscriptions to the budget's plan: POST what is new, PUT when topics go."""
        budget = self.source.budget
        async with self.lock:
            channel = self.channel
            if budget is None or channel is None:
                return
            version, planned = budget.plan(self.slot)
            wanted = [t for t in planned if t not in self.rejected]
            added = [t for t in wanted if t not in self.subscribed]
            if replace or self._prune_due(wanted, added):
                states = await self._put(channel, wanted)
                self._take(states, set(wanted), version)
            elif added:
                states = await self._post(channel, added)
                self._take(states, self.subscribed | set(added), version)

    def _prune_due(self, wanted: list[str], added: list[str]) -> bool:
        """Drop topics that went when it is time, or when keeping them would pass the channel's topic limit."""
        stale = self.subscribed - set(wanted)
        if not stale:
            return False
        if len(self.subscribed) + len(added) > self.config.max_topics:
            return True
        return asyncio.get_running_loop().time() - self.pruned_at >= self.config.prune_interval

    async def _put(self, channel: Channel, topics: list[str]) -> list[TopicState]:
        states = await asyncio.to_thread(self.api.replace_subscriptions, channel.id, topics)
        self.stats.subscription_puts += 1
        self.pruned_at = asyncio.get_running_loop().time()
        # Subscribing extends the channel's life to 24 h from now.
        self.channel = Channel(channel.id, channel.connect_uri,
                               self.source.clock() + timedelta(seconds=self.config.channel_ttl))
        logger.info("notifications: slot %d: channel %s subscribed to %d topics", self.slot, channel.id, len(topics))
        return states

    async def _post(self, channel: Channel, topics: list[str]) -> list[TopicState]:
        states = await asyncio.to_thread(self.api.add_subscriptions, channel.id, topics)
        self.stats.subscription_posts += 1
        logger.debug("notifications: slot %d: channel %s added %d topics", self.slot, channel.id, len(topics))
        return states

    def _take(self, states: list[TopicState], subscribed: set[str], version: int) -> None:
        refused = {s.id for s in states if s.rejected}
        self.stats.rejected_topics += len(refused - self.rejected)
        self.rejected |= refused
        self.subscribed = subscribed - refused
        self.synced_version = version
        base = {t for t in subscribed if not t.startswith("v2.detail.")}
        if base and refused >= base:
            raise FatalSourceError(
                f"Genesys rejected every queue and user topic of channel {self.channel.id if self.channel else '?'} "
                "(missing permissions logged above); give the OAuth client's role those permissions"
            )
        if any(t.startswith("v2.detail.") for t in refused):
            self._stop_following_details()

    def _stop_following_details(self) -> None:
        budget = self.source.budget
        if budget is not None and budget.details_enabled:
            logger.warning("notifications: detail-event topics are refused (missing permissions logged above); "
                           "conversations are followed by their snapshots only")
            budget.disable_details()

    async def _maintain(self) -> None:
        """Subscriptions follow the budget; the channel is re-subscribed (so extended) before it expires."""
        while True:
            await asyncio.sleep(max(self.config.sync_interval, self._quiet_for(None)))
            if self.channel is None or self.synced_version < 0:
                continue
            expiring = self._expiring()
            try:
                await self._sync(replace=expiring)
            except ChannelGone as exc:
                logger.info("notifications: slot %d: %s", self.slot, exc)
                self.synced_version = -1
                continue
            except TransientError as exc:
                wait = max(self.config.sync_interval, self._quiet_for(exc.retry_after))
                logger.warning("notifications: slot %d: subscriptions not updated (%s); %snext try in %.2fs",
                               self.slot, exc, asked(exc.retry_after), wait)
                continue
            if expiring:
                self.stats.channel_extensions += 1

    def _expiring(self) -> bool:
        channel = self.channel
        if channel is None or channel.expires is None:
            return False
        if channel.expires - self.source.clock() > timedelta(seconds=self.config.extend_margin):
            return False
        logger.info("notifications: slot %d: channel %s expires at %s; re-subscribing to extend it",
                    self.slot, channel.id, channel.expires.isoformat())
        return True

    # Sockets

    async def _open_socket(self) -> Socket:
        channel = self.channel
        assert channel is not None
        try:
            ws = await connect(channel.connect_uri, ping_interval=None, open_timeout=self.config.open_timeout,
                               close_timeout=CLOSE_TIMEOUT, max_size=MAX_MESSAGE_BYTES)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 404:
                raise ChannelGone(f"channel {channel.id} refused the WebSocket (404)") from None
            retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
            raise TransientError(f"channel {channel.id} refused the WebSocket ({status})",
                                 retry_after=retry_after) from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise TransientError(f"cannot open the WebSocket of channel {channel.id} ({short_reason(exc)})") from exc
        tracker = ConnectionTracker(source=SOURCE, listener=self.source.on_connection, channel_id=channel.id,
                                    report_interval=self.config.report_interval)
        socket = Socket(ws=ws, tracker=tracker, opened=asyncio.get_running_loop().time())
        self.sockets.append(socket)
        self.stats.connects += 1
        self.stats.last_connected_at = utc_now()
        logger.info("notifications: slot %d: socket %s open on channel %s", self.slot, tracker.connection_id,
                    channel.id)
        return socket

    async def _read(self, socket: Socket) -> Ending:
        """Read until the socket ends; the Ending says why and what comes next."""
        try:
            ending = await self._read_until_end(socket)
        except asyncio.CancelledError:
            socket.tracker.close("worker stopping")
            raise
        if ending.handover is None:
            await self._finish_socket(socket, ending.reason)
        return ending

    async def _read_until_end(self, socket: Socket) -> Ending:
        pinged = False
        while True:
            timeout = self.config.pong_timeout if pinged else self.config.idle_timeout
            try:
                raw = await _recv(socket.ws, timeout)
            except TimeoutError:
                if pinged:
                    self.stats.idle_reconnects += 1
                    return Ending(reason=f"idle: no message for {self.config.idle_timeout:g}s and no pong "
                                         f"within {self.config.pong_timeout:g}s of a ping")
                await self._ping(socket)
                pinged = True
                continue
            except ConnectionClosed as exc:
                return Ending(reason=_closed_reason(exc))
            pinged = False
            ending = await self._handle(socket, _text(raw))
            if ending is not None:
                return ending

    async def _ping(self, socket: Socket) -> None:
        self.stats.pings_sent += 1
        logger.info("notifications: slot %d: socket %s silent for %gs; sending a ping", self.slot,
                    socket.tracker.connection_id, self.config.idle_timeout)
        try:
            await socket.ws.send(PING)
        except ConnectionClosed:
            logger.info("notifications: slot %d: the ping found the socket closed", self.slot)

    async def _handle(self, socket: Socket, raw: str) -> Ending | None:
        message = await self._take_message(socket, raw)
        topic = message["topicName"] if message is not None else ""
        if topic.startswith(SYSTEM_PREFIX):
            return await self._system(topic, message or {}, socket)
        return None

    async def _take_message(self, socket: Socket, raw: str) -> dict[str, Any] | None:
        """Count and record a message; hand it to the reader unless it is a heartbeat, a pong or a system message."""
        self.stats.messages += 1
        self._mark_healthy(socket)
        message = parse_message(raw)
        topic = message["topicName"] if message is not None else ""
        if topic == METADATA_TOPIC:
            socket.tracker.heartbeat()
        elif not topic.startswith(SYSTEM_PREFIX):
            socket.tracker.events()
            await self.source.deliver(raw, message)
        return message

    def _mark_healthy(self, socket: Socket) -> None:
        """Only a socket that keeps delivering resets the backoff: accept-then-drop keeps growing the delay."""
        if socket.healthy or asyncio.get_running_loop().time() - socket.opened < self.config.stable_after:
            return
        socket.healthy = True
        self.backoff.reset()

    async def _system(self, topic: str, message: dict[str, Any], socket: Socket) -> Ending | None:
        body = message.get("eventBody")
        body = body if isinstance(body, dict) else {}
        if topic == "v2.system.socket_closing":
            return await self._handover(socket)
        if topic.startswith("v2.system.no_longer_subscribed"):
            self.stats.evictions += 1
            return Ending(reason=f"channel evicted ({body.get('reason') or 'no_longer_subscribed'}): a newer channel "
                                 "of this OAuth client took its place; is another process using the same client?",
                          new_channel=True)
        if topic.startswith("v2.system.token_revoked"):
            self.stats.tokens_revoked += 1
            self.api.tokens.invalidate()
            return Ending(reason=f"token revoked ({body.get('reason') or 'token_revoked'})", new_channel=True)
        logger.info("notifications: slot %d: system message %s: %s", self.slot, topic, body.get("message"))
        return None

    async def _handover(self, old: Socket) -> Ending | None:
        """socket_closing: open the new socket first; the old one is drained, then closed."""
        logger.info("notifications: slot %d: socket %s is closing for maintenance; opening its replacement",
                    self.slot, old.tracker.connection_id)
        try:
            new = await self._open_socket()
        except TransientError as exc:
            logger.warning("notifications: slot %d: replacement socket not opened (%s); reading the old one until "
                           "it closes", self.slot, exc)
            return None
        self.stats.handovers += 1
        drain = asyncio.create_task(self._drain(old), name=f"notifications-drain-{old.tracker.connection_id}")
        self.drains.add(drain)
        drain.add_done_callback(self.drains.discard)
        return Ending(reason="handed over after socket_closing", handover=new)

    async def _drain(self, old: Socket) -> None:
        """Whatever the old socket still delivers is kept; then it is closed, if the server has not done so."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.handover_grace
        reason = f"replaced after socket_closing; closed by us after {self.config.handover_grace:g}s"
        try:
            while (remaining := deadline - loop.time()) > 0:
                await self._take_message(old, _text(await _recv(old.ws, remaining)))
        except ConnectionClosed as exc:
            reason = f"replaced after socket_closing; {_closed_reason(exc)}"
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            reason = "worker stopping"
            raise
        finally:
            await self._finish_socket(old, reason)

    async def _finish_socket(self, socket: Socket, reason: str) -> None:
        socket.tracker.close(reason)
        if socket in self.sockets:
            self.sockets.remove(socket)
        await socket.ws.close()

    async def close_all(self, reason: str) -> None:
        sockets, self.sockets = list(self.sockets), []
        for socket in sockets:
            socket.tracker.close(reason)
        await asyncio.gather(*(s.ws.close() for s in sockets), return_exceptions=True)


async def _recv(ws: ClientConnection, timeout: float) -> str | bytes:
    """The next message within `timeout` seconds (TimeoutError otherwise).

    asyncio.timeout, not wait_for: on Python 3.11, wait_for can swallow a cancellation that arrives as the
    message does, and a stopping worker would then wait for a task that never ends.
    """
    async with asyncio.timeout(timeout):
        return await ws.recv()


def _text(raw: str | bytes) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


def _closed_reason(exc: ConnectionClosed) -> str:
    received = exc.rcvd
    if received is None:
        return "dropped (no close frame)"
    return f"closed by the server (code {received.code}{': ' + received.reason if received.reason else ''})"
