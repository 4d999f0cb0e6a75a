"""A fake Genesys Cloud that speaks the wire only: OAuth client credentials, the SSE event stream and the
Notifications API (channels, subscriptions, a WebSocket per channel: see simulator_notifications.py).

`Simulator` is the state: an append-only event log (bounded), issued tokens, fault knobs and stats.
`SimulatorServer` serves it over real HTTP with aiohttp, on 127.0.0.1 and an ephemeral port by default,
from its own thread and event loop, so tests and `make demo` talk to it exactly as they would to Genesys:

    sim = Simulator(seed=7)
    sim.generate(conversations=20)
    with SimulatorServer(sim) as server:
        ...  # point the client at server.url (API and login host both)

Endpoints: `POST /oauth/token`, `POST /api/v2/analytics/events` (text/event-stream, resumable with
Last-Event-ID), `GET /api/v2/routing/wrapupcodes/{id}`, and the Notifications API mounted by
`NotificationsRoutes` (`sim.notifications` is its state). The contract is /work/shared/genesys/README.md,
sections 2, 3 and 4, and the shared INTERFACES.md. Every lifecycle payload appended to the SSE log is also
published as Notifications snapshots and detail events of the same moment, so both sources tell one story.
`POST /api/v2/analytics/conversations/details/query` (section 5, `sim.analytics`, simulator_analytics.py) answers
from every conversation appended, including those no socket or stream was there to hear.

Every knob is thread-safe: tests call them from their own thread while the server thread streams.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import random
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from conversations.genesys.scenario import DEFAULT_START, WRAPUP_CODE_NAMES, ConversationScript, Scenario
from conversations.genesys.simulator_analytics import AnalyticsRoutes, AnalyticsStore
from conversations.genesys.simulator_notifications import NotificationsHub, NotificationsRoutes

logger = logging.getLogger(__name__)

LINE_ENDINGS = ("\n", "\r", "\r\n")
KEEPALIVE_FORMS = ("comment", "empty-object", "empty-data")
BOM = b"\xef\xbb\xbf"
DEFAULT_MAX_LOG = 200_000

# Genesys-style error codes and messages for the statuses the simulator can be asked to answer.
_GENESYS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad.request", "The request could not be understood by the server due to malformed syntax."),
    401: ("bad.credentials", "Invalid login credentials."),
    403: ("missing.permissions", "You are missing the following permission(s): analytics:events:view"),
    404: ("not.found", "The requested resource was not found."),
    429: ("too.many.requests.retry.after", "Rate limit exceeded the maximum. Retry in [{retry}] seconds."),
    500: ("internal.server.error", "The server encountered an unexpected condition."),
    502: ("bad.gateway", "The server received an invalid response from an upstream server."),
    503: ("service.unavailable", "The service is currently unavailable, please try again later."),
    504: ("gateway.timeout", "The upstream server did not respond in time."),
}


# --- the event log ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One position in the log: an event (rendered as `id:` + `data:` lines) or raw SSE text."""

    seq: int
    data: bytes
    raw: bool = False
    with_id: bool = True

    @property
    def sse_id(self) -> str | None:
        return str(self.seq) if self.with_id and not self.raw else None

    def render(self, line_ending: bytes) -> bytes:
        if self.raw:
            return self.data
        head = b"id: %d%s" % (self.seq, line_ending) if self.with_id else b""
        return head + b"data: " + self.data + line_ending + line_ending


@dataclass(frozen=True, slots=True)
class Failure:
    """A canned error answer for the next stream request (see `Simulator.fail_next`)."""

    status: int
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What one stream connection does: its byte format (fixed when it opens) and its one-shot faults."""

    line_ending: bytes
    chunk_size: int | None
    send_bom: bool
    drop_after: int | None = None
    stall_after: int | None = None


@dataclass
class Stats:
    """What the server has served; read a copy through `Simulator.stats`."""

    token_requests: int = 0
    token_statuses: list[int] = field(default_factory=list)
    stream_requests: int = 0
    last_event_ids: list[str | None] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    queries: list[Any] = field(default_factory=list)
    open_streams: int = 0
    events_sent: int = 0
    keepalives_sent: int = 0
    appended: int = 0
    wrapupcode_requests: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, list) else value for name, value in vars(self).items()}


class Simulator:
    """The fake org's state: event log, tokens, knobs and stats. Knows the wire, never the database."""

    def __init__(
        self,
        *,
        client_id: str = "sim-client",
        client_secret: str = "sim-secret",
        token_ttl: float = 3600,
        seed: int | None = None,
        max_log: int = DEFAULT_MAX_LOG,
        first_id: int = 1,
        keepalive_interval: float = 15.0,
        reject_rate: float = 0.0,
    ) -> None:
        if max_log < 1:
            raise ValueError(f"max_log must be at least 1, not {max_log!r}")
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self.keepalive_interval = keepalive_interval
        self.keepalive_forms: tuple[str, ...] = ("comment",)
        self.send_bom = False
        self.duplicate_rate = 0.0
        self.reorder_window = 0
        self.malformed_rate = 0.0
        self.wrapup_codes: dict[str, str] = dict(WRAPUP_CODE_NAMES)
        self.scenario = Scenario(seed, reject_rate=reject_rate)
        self.notifications = NotificationsHub(tokens=self, client_id=client_id)
        # Every generated conversation, for the analytics details query (simulator_analytics.py).
        self.analytics = AnalyticsStore()
        self._seed = seed
        self._chunk_size: int | None = None
        self._line_ending = "\n"
        self._lock = threading.Lock()
        self._log: deque[LogEntry] = deque(maxlen=max_log)
        self._next_seq = first_id
        self._tokens: dict[str, float] = {}
        self._issued: deque[str] = deque(maxlen=1000)  # for tests that check no token reaches a log
        self._failures: deque[Failure] = deque()
        self._drop_after: int | None = None
        self._stall_after: int | None = None
        self._stats = Stats()
        self._listeners: list[Callable[[], None]] = []
        self._emitter = _FaultyEmitter(self, random.Random(seed))
        self._live: LiveGenerator | None = None

    # --- format knobs (validated, read once per stream connection) -------------------------------------

    @property
    def line_ending(self) -> str:
        return self._line_ending

    @line_ending.setter
    def line_ending(self, value: str) -> None:
        if value not in LINE_ENDINGS:
            raise ValueError(f"line_ending must be one of {LINE_ENDINGS!r}, not {value!r}")
        self._line_ending = value

    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError(f"chunk_size must be a positive number of bytes or None, not {value!r}")
        self._chunk_size = value

    # --- the log ---------------------------------------------------------------------------------------

    def append(self, payload: dict[str, Any], *, with_id: bool = True) -> str | None:
        """Append one event; returns its SSE id (None when it is sent without an `id:` line).

        A lifecycle payload is also published on the Notifications API (snapshot and detail events) and kept for
        the analytics details query.
        """
        sse_id = self._append_entry(orjson.dumps(payload), with_id=with_id).sse_id
        self.notifications.publish(payload)
        self.analytics.record(payload)  # kept whether or not a socket or stream heard it: backfill finds it
        return sse_id

    def append_raw(self, text: str) -> None:
        """Append SSE text that is written verbatim (odd framing, malformed lines, comments...)."""
        self._append_entry(text.encode("utf-8"), raw=True)

    def append_data(self, data: bytes, *, with_id: bool = True) -> str | None:
        """Append an event whose `data:` line is these bytes, JSON or not (no line breaks allowed)."""
        if b"\n" in data or b"\r" in data:
            raise ValueError("an event's data must be one line; use append_raw for multi-line data")
        return self._append_entry(data, with_id=with_id).sse_id

    def generate(self, conversations: int = 20, *, start: datetime | None = None) -> list[dict[str, Any]]:
        """Append `conversations` interleaved lifecycles; returns their payloads in timestamp order.

        The fault knobs (duplicate_rate, reorder_window, malformed_rate) apply, so the log may hold
        duplicates, another order or malformed entries; the returned list has each payload once.
        """
        with self._emitter.lock:
            payloads = self.scenario.timeline(conversations, start=start or DEFAULT_START)
        for payload in payloads:
            self._emitter.emit(payload)
        self._emitter.flush()
        return payloads

    @property
    def last_id(self) -> str | None:
        """The SSE id of the newest event that has one."""
        with self._lock:
            return next((entry.sse_id for entry in reversed(self._log) if entry.sse_id), None)

    @property
    def log_size(self) -> int:
        """How many entries the log holds now (at most `max_log`)."""
        with self._lock:
            return len(self._log)

    def resume_seq(self, last_event_id: str | None) -> int:
        """The log position a stream starts from, given the client's Last-Event-ID header."""
        try:
            seen = int(last_event_id) if last_event_id is not None else -1
        except ValueError:
            return 0
        with self._lock:
            # An id this server never gave (from before a restart, say) cannot be resumed: replay all we hold.
            return 0 if seen >= self._next_seq else seen + 1

    def read_log(self, seq: int, limit: int = 500) -> list[LogEntry]:
        """Up to `limit` entries from position `seq`; from the oldest retained one if `seq` was trimmed."""
        with self._lock:
            if not self._log:
                return []
            start = max(seq - self._log[0].seq, 0)
            return list(islice(self._log, start, start + limit))

    def _append_entry(self, data: bytes, *, raw: bool = False, with_id: bool = True) -> LogEntry:
        with self._lock:
            entry = LogEntry(seq=self._next_seq, data=data, raw=raw, with_id=with_id)
            self._next_seq += 1
            self._log.append(entry)
            self._stats.appended += 1
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
        return entry

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs (in the appending thread) after every append; servers use it to wake streams."""
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.remove(callback)

    # --- tokens ------------------------------------------------------------------------------------------

    def issue_token(self, client_id: str, client_secret: str) -> str | None:
        """A new opaque bearer token, or None when the credentials are wrong."""
        if not (_same(client_id, self.client_id) and _same(client_secret, self.client_secret)):
            return None
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_ttl
            self._issued.append(token)
        return token

    def issued_tokens(self) -> list[str]:
        """The most recent tokens handed out (at most 1,000), expired or not."""
        with self._lock:
            return list(self._issued)

    def token_valid(self, token: str) -> bool:
        with self._lock:
            expires_at = self._tokens.get(token)
            if expires_at is not None and expires_at <= time.monotonic():
                del self._tokens[token]
                expires_at = None
        return expires_at is not None

    def invalidate_token(self, token: str) -> None:
        """This one token stops working (a revocation); others stay valid."""
        with self._lock:
            self._tokens.pop(token, None)

    def expire_tokens(self) -> None:
        """Every token issued so far becomes invalid: the API answers 401 until the client logs in again."""
        with self._lock:
            self._tokens.clear()

    # --- one-shot fault knobs ----------------------------------------------------------------------------

    def fail_next(self, status: int, *, count: int = 1, retry_after: int | None = None) -> None:
        """The next `count` stream requests get `status` with a Genesys error body (429: with Retry-After)."""
        with self._lock:
            self._failures.extend(Failure(status, retry_after) for _ in range(count))

    def drop_after(self, n: int) -> None:
        """Next stream connection: send n entries, then half of the next one, then abort the connection."""
        with self._lock:
            self._drop_after = n

    def stall_after(self, n: int) -> None:
        """Next stream connection: send n entries, then nothing at all (no keep-alives) until shutdown."""
        with self._lock:
            self._stall_after = n

    def take_failure(self) -> Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def take_stream_plan(self) -> StreamPlan:
        """The format and faults of a stream connection that is opening now (the faults are used up)."""
        with self._lock:
            plan = StreamPlan(
                line_ending=self._line_ending.encode("ascii"),
                chunk_size=self._chunk_size,
                send_bom=self.send_bom,
                drop_after=self._drop_after,
                stall_after=self._stall_after,
            )
            self._drop_after = self._stall_after = None
        return plan

    # --- live generation ---------------------------------------------------------------------------------

    def start_live(self, rate: float = 2.0, *, concurrency: int | None = None) -> None:
        """Keep appending interleaved lifecycles at about `rate` events/s, stamped with the wall clock."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate!r}")
        self.stop_live()
        seed = None if self._seed is None else self._seed + 1
        reject_rate = self.scenario.reject_rate
        self._live = LiveGenerator(
            self._emitter, rate=rate, concurrency=concurrency, seed=seed, reject_rate=reject_rate
        )
        self._live.start()

    def stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            self._emitter.flush()

    @property
    def live(self) -> bool:
        return self._live is not None and self._live.is_alive()

    # --- stats -------------------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: token_requests, stream_requests, last_event_ids, statuses (of stream requests),
        token_statuses, queries (stream request bodies), open_streams, events_sent, keepalives_sent,
        appended, wrapupcode_requests."""
        with self._lock:
            return self._stats.snapshot()

    def record(self, update: Callable[[Stats], None]) -> None:
        """Apply `update` to the stats under the lock (used by the server)."""
        with self._lock:
            update(self._stats)


class _FaultyEmitter:
    """Appends generated payloads through the demo fault knobs: duplicates, reordering, malformed data."""

    def __init__(self, sim: Simulator, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.lock = threading.RLock()
        self._held: list[dict[str, Any]] = []

    def emit(self, payload: dict[str, Any]) -> None:
        with self.lock:
            self._held.append(payload)
            # Holding back up to `reorder_window` events and releasing a random one swaps neighbours.
            while len(self._held) > self.sim.reorder_window:
                self._append(self._held.pop(self.rng.randrange(len(self._held))))

    def flush(self) -> None:
        with self.lock:
            self.rng.shuffle(self._held)
            for payload in self._held:
                self._append(payload)
            self._held.clear()

    def _append(self, payload: dict[str, Any]) -> None:
        self.sim.append(payload)
        if self.rng.random() < self.sim.duplicate_rate:
            self.sim.append(payload)
        if self.rng.random() < self.sim.malformed_rate:
            self.sim.append_data(self._malformed(payload))

    def _malformed(self, payload: dict[str, Any]) -> bytes:
        text = orjson.dumps(payload).decode("utf-8")
        kind = self.rng.randrange(4)
        if kind == 0:  # truncated JSON, cut on a character boundary so the stream stays valid UTF-8
            return text[: self.rng.randrange(1, len(text))].encode("utf-8")
        if kind == 1:
            return b"this is not JSON"
        if kind == 2:  # JSON, but not an object
            return orjson.dumps([payload["eventType"], payload["conversationId"]])
        return orjson.dumps({"eventType": payload["eventType"]})  # an object missing conversationId


class LiveGenerator(threading.Thread):
    """Appends lifecycles at about `rate` events/s, several conversations in flight at once."""

    def __init__(
        self,
        emitter: _FaultyEmitter,
        *,
        rate: float,
        concurrency: int | None = None,
        seed: int | None = None,
        reject_rate: float = 0.0,
    ) -> None:
        super().__init__(name="genesys-simulator-live", daemon=True)
        self._emitter = emitter
        self._interval = 1.0 / rate
        self._concurrency = concurrency or max(3, min(50, round(rate * 3)))
        self._scenario = Scenario(seed, reject_rate=reject_rate)
        self._active: list[ConversationScript] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self._stopped.wait(max(0.0, due - time.monotonic())):
            self.step()
            # After a pause (a suspended laptop), carry on at the rate instead of catching up in a burst.
            due = max(due + self._interval, time.monotonic() - self._interval)

    def step(self) -> None:
        rng = self._scenario.rng
        if len(self._active) < self._concurrency and (not self._active or rng.random() < 0.5):
            self._active.append(self._scenario.script())
        script = rng.choice(self._active)
        self._emitter.emit(script.next_event(datetime.now(UTC)))
        if script.done:
            self._active.remove(script)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)


# --- the HTTP server ---------------------------------------------------------------------------------


class SimulatorServer:
    """Serves a `Simulator` over HTTP from its own thread and event loop; a context manager."""

    def __init__(
        self, sim: Simulator, *, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 1.0
    ) -> None:
        self.sim = sim
        self.host = host
        self._sock = _listening_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._shutdown_timeout = shutdown_timeout
        self._thread = threading.Thread(target=self._run, name="genesys-simulator-http", daemon=True)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SimulatorServer:
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise RuntimeError(f"simulator server failed to start on {self.url}") from self._startup_error
        logger.info("genesys simulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        """End every open stream (cleanly, with the last chunk) and stop serving.

        A stream blocked on a client that stopped reading gets `shutdown_timeout` seconds, then is cancelled.
        """
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(self._begin_shutdown)
            self._thread.join(timeout=self._shutdown_timeout + 5)
        self._sock.close()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- the server thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception as exc:  # hand the error to the thread waiting in start(), if it still waits
            logger.exception("genesys simulator server on %s failed", self.url)
            self._startup_error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stopping, self._changed = asyncio.Event(), asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        self.sim.add_listener(self._wake_from_any_thread)
        self.sim.notifications.attach(asyncio.get_running_loop())
        sweeper = asyncio.create_task(self.sim.notifications.run_sweeper())
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            self.sim.remove_listener(self._wake_from_any_thread)
            sweeper.cancel()
            await self.sim.notifications.shutdown()
            await runner.cleanup()
            self.sim.notifications.attach(None)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_post("/api/v2/analytics/events", self._events)
        app.router.add_get("/api/v2/routing/wrapupcodes/{code_id}", self._wrapup_code)
        routes = NotificationsRoutes(self.sim.notifications, authorized=self._authorized, error=genesys_error)
        routes.mount(app)
        AnalyticsRoutes(self.sim.analytics, authorized=self._authorized, error=genesys_error).mount(app)
        return app

    def _begin_shutdown(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        self._wake()

    def _wake_from_any_thread(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop closed between the check and the call: nobody is left to wake
            logger.debug("simulator loop closed; append not signalled")

    def _wake(self) -> None:
        """Wake every waiting stream: each holds the event that was current when it looked at the log."""
        assert self._changed is not None
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- handlers ------------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        credentials = _basic_credentials(request.headers.get("Authorization", ""))
        if form.get("grant_type") != "client_credentials":
            description = "grant_type must be client_credentials"
            response = _json(400, {"error": "unsupported_grant_type", "description": description})
        elif credentials is None or (token := self.sim.issue_token(*credentials)) is None:
            response = _json(401, {"error": "invalid_client", "description": "client id or secret is wrong"})
        else:
            expires_in = max(1, math.ceil(self.sim.token_ttl))
            response = _json(200, {"access_token": token, "token_type": "bearer", "expires_in": expires_in})
        self.sim.record(lambda s: _count_token(s, response.status))
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        last_event_id = request.headers.get("Last-Event-ID")
        query = await _read_query(request)
        refusal = self._refusal(request, query)
        self.sim.record(lambda s: _count_stream(s, last_event_id, query, refusal.status if refusal else 200))
        if refusal is not None:
            return refusal
        stream = _Stream(request, self.sim, self.sim.take_stream_plan())
        await stream.open()
        logger.info("simulator stream opened (Last-Event-ID %s)", last_event_id)
        try:
            await self._pump(stream, self.sim.resume_seq(last_event_id))
        except ConnectionError:
            logger.info("simulator stream client went away after %d entries", stream.sent)
        else:
            logger.info("simulator stream closed after %d entries", stream.sent)
        finally:
            self.sim.record(_close_stream)
        return stream.response

    def _refusal(self, request: web.Request, query: Any) -> web.Response | None:
        """The error answer for this stream request, if any: canned failure, bad token, bad body."""
        failure = self.sim.take_failure()
        if failure is not None:
            logger.info("simulator answering a stream request with %d (fail_next)", failure.status)
            return genesys_error(failure.status, retry_after=failure.retry_after)
        if not self._authorized(request):
            return genesys_error(401)
        if query is _INVALID:
            return genesys_error(400)
        return None

    async def _wrapup_code(self, request: web.Request) -> web.Response:
        self.sim.record(_count_wrapup_code)
        if not self._authorized(request):
            return genesys_error(401)
        code_id = request.match_info["code_id"]
        name = self.sim.wrapup_codes.get(code_id)
        if name is None:
            return genesys_error(404)
        return _json(200, {"id": code_id, "name": name, "selfUri": f"/api/v2/routing/wrapupcodes/{code_id}"})

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.sim.token_valid(token.strip())

    # --- streaming -----------------------------------------------------------------------------------

    async def _pump(self, stream: _Stream, seq: int) -> None:
        """Send the log from `seq` on, then wait for appends, with keep-alives while idle."""
        assert self._stopping is not None and self._changed is not None
        while not self._stopping.is_set():
            if stream.fault_at(stream.sent) == "stall":  # go silent now, not at the next entry
                await self._stall(stream)
                return
            changed = self._changed  # taken before reading the log, so an append in between still wakes us
            entries = self.sim.read_log(seq)
            if entries:
                next_seq = await self._send(stream, entries)
                if next_seq is None:
                    return
                seq = next_seq
            elif not await _wait(changed, self.sim.keepalive_interval):
                await stream.keepalive()

    async def _send(self, stream: _Stream, entries: list[LogEntry]) -> int | None:
        """Write entries in one piece; returns the next position, or None once a fault ended the stream."""
        pending: list[bytes] = []
        for entry in entries:
            fault = stream.fault_at(stream.sent + len(pending))
            if fault is not None:
                await stream.write_entries(pending)
                if fault == "drop":
                    await stream.drop(entry.render(stream.plan.line_ending))
                else:
                    await self._stall(stream)
                return None
            pending.append(entry.render(stream.plan.line_ending))
        await stream.write_entries(pending)
        return entries[-1].seq + 1

    async def _stall(self, stream: _Stream) -> None:
        assert self._stopping is not None
        logger.info("simulator stream stalled after %d entries", stream.sent)
        await self._stopping.wait()


class _Stream:
    """One open SSE response: writes in the plan's format and counts what it sent."""

    def __init__(self, request: web.Request, sim: Simulator, plan: StreamPlan) -> None:
        self.request = request
        self.sim = sim
        self.plan = plan
        self.sent = 0
        self._bom_pending = plan.send_bom
        self._keepalives = 0
        self.response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
        )
        self.response.enable_chunked_encoding()

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        if self._bom_pending:
            data, self._bom_pending = BOM + data, False
        if not data:
            return
        size = self.plan.chunk_size or len(data)
        for start in range(0, len(data), size):
            await self.response.write(data[start : start + size])

    async def write_entries(self, rendered: list[bytes]) -> None:
        # Counted before writing, so a client that has read something never sees stats lagging behind it.
        count = len(rendered)
        self.sim.record(lambda stats: _count_sent(stats, count))
        self.sent += count
        await self.write(b"".join(rendered))

    def fault_at(self, position: int) -> str | None:
        """Which fault ("drop" or "stall") is due before entry number `position`, if any."""
        if self.plan.drop_after == position:
            return "drop"
        if self.plan.stall_after == position:
            return "stall"
        return None

    async def keepalive(self) -> None:
        forms = self.sim.keepalive_forms or ("comment",)
        form = forms[self._keepalives % len(forms)]
        self._keepalives += 1
        self.sim.record(_count_keepalive)
        await self.write(_keepalive_bytes(form, self.plan.line_ending))

    async def drop(self, entry_bytes: bytes) -> None:
        """Send the first half of an entry, then abort the connection: the client sees a truncated body."""
        await self.write(entry_bytes[: max(1, len(entry_bytes) // 2)])
        transport = self.request.transport
        if transport is None:
            return
        # abort() discards unsent bytes; let the half entry reach the socket first.
        deadline = time.monotonic() + 1.0
        while transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        logger.info("simulator dropping stream after %d entries", self.sent)
        transport.abort()


# --- small helpers ---------------------------------------------------------------------------------------

_INVALID = object()


def genesys_error(status: int, *, retry_after: int | None = None, message: str | None = None) -> web.Response:
    """An error answer shaped like Genesys's: {"message", "code", "status", "contextId", ...}."""
    if status == 429 and retry_after is None:
        retry_after = 1  # Genesys always says when to come back after a 429
    code, default_message = _GENESYS_ERRORS.get(status, ("error", "The request failed."))
    body = {
        "message": message or default_message.format(retry=retry_after),
        "code": code,
        "status": status,
        "contextId": str(uuid.uuid4()),
        "details": [],
        "errors": [],
    }
    response = _json(status, body)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison that also accepts non-ASCII text."""
    return secrets.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else None


async def _read_query(request: web.Request) -> Any:
    """The stream request's JSON body (None when empty, _INVALID when it is not JSON). Not used to filter."""
    body = await request.read()
    if not body.strip():
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _INVALID


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """True if `event` was set within `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout=max(timeout, 0.001))
    except TimeoutError:
        return False
    return True


def _keepalive_bytes(form: str, line_ending: bytes) -> bytes:
    if form == "empty-object":
        return b"data: {}" + line_ending + line_ending
    if form == "empty-data":
        return b"data:" + line_ending + line_ending
    return b": keep-alive" + line_ending


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _count_token(stats: Stats, status: int) -> None:
    stats.token_requests += 1
    stats.token_statuses.append(status)


def _count_stream(stats: Stats, last_event_id: str | None, query: Any, status: int) -> None:
    stats.stream_requests += 1
    stats.last_event_ids.append(last_event_id)
    stats.queries.append(None if query is _INVALID else query)
    stats.statuses.append(status)
    if status == 200:
        stats.open_streams += 1


def _close_stream(stats: Stats) -> None:
    stats.open_streams -= 1


def _count_sent(stats: Stats, count: int) -> None:
    stats.events_sent += count


def _count_keepalive(stats: Stats) -> None:
    stats.keepalives_sent += 1


def _count_wrapup_code(stats: Stats) -> None:
    stats.wrapupcode_requests += 1
