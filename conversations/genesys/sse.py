"""The SSE source: `POST {api}/api/v2/analytics/events`, a `text/event-stream` resumed by Last-Event-ID.

The source knows the wire and nothing about the database: it yields SSEMessages and leaves their meaning
to the normalizer. Transient failures (network, drops, 429, 5xx, silence past `read_timeout`) reconnect
forever with backoff; a refused token or permission raises FatalSourceError.
"""

from __future__ import annotations

import http.client
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3.exceptions

from conversations.genesys import rest
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import TransientError, error_detail, short_reason
from conversations.genesys.eventstream import SSEDecoder, SSEMessage
from conversations.genesys.notifications import ConnectionListener, ConnectionTracker

logger = logging.getLogger(__name__)

EVENTS_PATH = "/api/v2/analytics/events"
EVENT_TYPES = ("conversation:start", "conversation:update", "conversation:end", "conversation:wrapup")
# read1() returns whatever one socket read brings, up to this much: an event written alone comes out alone.
READ_SIZE = 65536
ERROR_BODY_LIMIT = 2048
# How often the stop watcher looks at `stop`; a blocked read is woken by shutting its socket down.
STOP_POLL_SECONDS = 0.1
_READ_ERRORS = (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)


def default_query() -> dict[str, Any]:
    """The contract's query without its voice-only filter: the monitor watches every media type."""
    return {"eventTypes": list(EVENT_TYPES), "interval": "PT1S"}


@dataclass
class SourceStats:
    connects: int = 0  # streams opened (200 text/event-stream)
    reconnects: int = 0  # failures after which a new connection was scheduled
    messages: int = 0  # keep-alives sent as `data:` or `data: {}` included; comments never become messages
    last_connected_at: datetime | None = None
    last_error: str | None = None


class SSESource:
    name = "sse"

    def __init__(
        self,
        *,
        api_url: str,
        tokens: TokenProvider,
        query: dict[str, Any] | None = None,
        last_event_id: str | None = None,
        read_timeout: float = 90.0,
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
        stop: threading.Event | None = None,
        session: requests.Session | None = None,
        on_connection: ConnectionListener | None = None,
    ) -> None:
        self.url = api_url.rstrip("/") + EVENTS_PATH
        # Connection history: told when each stream opens, what it delivers, and when and why it ends.
        self._on_connection = on_connection
        self._tracker: ConnectionTracker | None = None
        self.query = dict(query) if query is not None else default_query()
        self.tokens = tokens
        # Set it (from any thread, a signal handler included) and messages() returns within moments.
        self.stop = stop or threading.Event()
        self.stats = SourceStats()
        self._decoder = SSEDecoder(last_event_id=last_event_id)
        self._timeouts = (connect_timeout, read_timeout)
        self._backoff = backoff or Backoff()
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._response: requests.Response | None = None
        self._closed = False
        # Ends a wait before reconnecting early: set by close(), and by the stop watcher once `stop` is set.
        self._wake = threading.Event()

    @property
    def last_event_id(self) -> str | None:
        """The id sent as Last-Event-ID on the next connection (that of the last complete event)."""
        return self._decoder.last_event_id

    def messages(self) -> Iterator[SSEMessage]:
        """Yield every message as soon as it arrives, reconnecting forever; return when `stop` is set.

        Comments never become messages; `data:` and `data: {}` keep-alives do, as the standard says, and are
        the normalizer's to drop. Raises FatalSourceError when Genesys refuses the client, the token (twice
        in a row) or the permission.
        """
        watching = threading.Event()
        watching.set()
        threading.Thread(
            target=self._watch_stop, args=(watching,), name="sse-stop-watch", daemon=True
        ).start()
        try:
            while self._running():
                try:
                    yield from self._stream_once()
                except TransientError as exc:
                    self._pause(exc)
        finally:
            watching.clear()
        logger.info("sse: stopped (%s connects, %s messages)", self.stats.connects, self.stats.messages)

    def close(self) -> None:
        """Stop reading and release the connection; a running `messages()` returns."""
        self._closed = True
        self._wake.set()
        self._abort_response()
        if self._owns_session:
            self._session.close()

    def _running(self) -> bool:
        return not self._closed and not self.stop.is_set()

    def _stream_once(self) -> Iterator[SSEMessage]:
        response = self._open()
        with self._lock:
            self._response = response
        reason = "stopped"
        try:
            # `stop` may have been set while connecting, before the watcher could see this response.
            if self._running():
                self._on_connected()
                yield from self._read(response)
        except TransientError as exc:
            reason = str(exc)
            raise
        finally:
            with self._lock:
                self._response = None
            response.close()
            self._on_disconnected(reason)

    # Connecting

    def _open(self) -> requests.Response:
        """A 200 text/event-stream response; a 401 gets one token renewal and one more try."""
        what = f"the event stream at {self.url}"
        response = rest.renewing_once(self._post, tokens=self.tokens, what=what, detail=self._detail)
        response = rest.checked(
            response, what=what, detail=self._detail, accept=lambda status: status == 200,
            forbidden="the OAuth client lacks a permission for analytics events",
        )
        return self._checked_content_type(response)

    def _post(self) -> requests.Response:
        headers = {
            "Authorization": f"Bearer {self.tokens.token()}",
            "Accept": "text/event-stream",
            # A compressed stream would sit in the decompressor's buffer instead of reaching us at once.
            "Accept-Encoding": "identity",
            "Cache-Control": "no-cache",
        }
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            return self._session.post(
                self.url, json=self.query, headers=headers, stream=True, timeout=self._timeouts
            )
        except requests.RequestException as exc:
            raise TransientError(f"cannot connect to {self.url} ({short_reason(exc)})") from exc

    def _checked_content_type(self, response: requests.Response) -> requests.Response:
        content_type = response.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() == "text/event-stream":
            return response
        response.close()
        raise TransientError(
            f"{self.url} answered 200 with Content-Type {content_type!r}, not text/event-stream"
        )

    def _detail(self, response: requests.Response) -> str:
        """The error body's message, read at most ERROR_BODY_LIMIT bytes; the response is closed after."""
        try:
            return error_detail(response.raw.read(ERROR_BODY_LIMIT, decode_content=True) or b"")
        except _READ_ERRORS as exc:
            return f"(error body unreadable: {short_reason(exc)})"
        finally:
            response.close()

    def _on_connected(self) -> None:
        # A new stream: it may start with its own BOM, and a half event from the old one is gone for good.
        self._decoder.reset()
        self.stats.connects += 1
        self.stats.last_connected_at = datetime.now(UTC)
        if self._on_connection is not None:
            self._tracker = ConnectionTracker(source=self.name, listener=self._on_connection)
        logger.info(
            "sse: connected to %s (connect #%s, %s reconnects so far, Last-Event-ID %s)",
            self.url,
            self.stats.connects,
            self.stats.reconnects,
            self.last_event_id,
        )

    def _on_disconnected(self, reason: str) -> None:
        if self._tracker is not None:
            self._tracker.close(reason)
            self._tracker = None

    # Reading

    def _read(self, response: requests.Response) -> Iterator[SSEMessage]:
        healthy = False
        while self._running():
            chunk = self._read_chunk(response)
            if chunk is None:
                return
            messages = self._decoder.feed(chunk)
            if self._tracker is not None:  # any bytes, keep-alive comments included, prove the stream alive
                self._tracker.heartbeat()
                if messages:
                    self._tracker.events(len(messages))
            if messages and not healthy:
                # Only a stream that delivers resets the backoff; accept-then-drop keeps growing the delay.
                healthy = True
                self._backoff.reset()
            self.stats.messages += len(messages)
            yield from messages

    def _read_chunk(self, response: requests.Response) -> bytes | None:
        """The next bytes, as soon as any arrive; None once stopped; TransientError when the stream fails."""
        try:
            chunk: bytes = response.raw.read1(READ_SIZE, decode_content=True)
        except _READ_ERRORS as exc:
            if not self._running():
                return None
            raise TransientError(self._read_failure(exc)) from exc
        if chunk:
            return chunk
        if not self._running():
            return None
        raise TransientError("the server ended the stream")

    def _read_failure(self, exc: BaseException) -> str:
        if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return f"no data from the stream for {self._timeouts[1]}s (read timeout)"
        return f"the stream broke ({short_reason(exc)})"

    # Waiting and stopping

    def _pause(self, exc: TransientError) -> None:
        self.stats.reconnects += 1
        self.stats.last_error = str(exc)
        delay = self._backoff.next_delay(self._delay_floor(exc))
        logger.warning(
            "sse: %s; reconnecting in %.2fs (reconnect #%s, Last-Event-ID %s)",
            exc,
            delay,
            self.stats.reconnects,
            self.last_event_id,
        )
        self._wake.wait(delay)

    def _delay_floor(self, exc: TransientError) -> float | None:
        """Retry-After, or the stream's own `retry:` reconnection time (capped), whichever is longer."""
        floors = [exc.retry_after] if exc.retry_after is not None else []
        if self._decoder.retry is not None:
            floors.append(min(self._decoder.retry / 1000, self._backoff.cap))
        return max(floors) if floors else None

    def _watch_stop(self, watching: threading.Event) -> None:
        # A read on a silent stream blocks until data or `read_timeout`; shutting the socket down ends it now.
        while watching.is_set():
            if self.stop.wait(STOP_POLL_SECONDS):
                self._wake.set()
                self._abort_response()
                return

    def _abort_response(self) -> None:
        with self._lock:
            response = self._response
            if response is None:
                return
            try:
                response.raw.shutdown()
            except (ValueError, RuntimeError, OSError) as exc:
                # Already closed or released: nothing is blocked on it any more.
                logger.debug("sse: could not shut the stream down (%s)", short_reason(exc))
