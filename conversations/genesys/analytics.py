"""The analytics conversation details query: Genesys Cloud's record of every conversation, for backfill.

`POST {api}/api/v2/analytics/conversations/details/query` (../shared/genesys/README.md, section 5) with
`{"interval": "START/END", "paging": {"pageSize": 100, "pageNumber": N}, "order": "asc", "orderBy":
"conversationStart"}` answers `{"conversations": [...], "totalHits": N}` (`conversations` is absent on an
empty page). An interval spans at most 7 days, so a longer window is split; pages shift while data arrives, so
a row can come twice: every conversation is handed out once per query, the first time it is seen.

Errors are classified like the other Genesys clients: 429, 408, 5xx and network failures are transient and
retried here (Retry-After honoured, else capped exponential backoff with jitter) up to `max_attempts` tries;
a 401 gets one new token and one more try; 403 (the OAuth client's role lacks
analytics:conversationDetail:view), 400 and 404 are fatal. Knows the wire only, never the database.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from conversations.genesys import rest
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import TransientError

logger = logging.getLogger(__name__)

DETAILS_QUERY_PATH = "/api/v2/analytics/conversations/details/query"
MAX_INTERVAL = timedelta(days=7)
PAGE_SIZE = 100
MAX_ATTEMPTS = 6


class QueryInterrupted(TransientError):
    """The caller stopped while a retry was waiting."""


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and Z, as Genesys writes times."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def intervals(
    since: datetime, until: datetime, *, longest: timedelta = MAX_INTERVAL
) -> list[tuple[datetime, datetime]]:
    """[since, until) cut into consecutive intervals of at most `longest`, oldest first."""
    if until <= since:
        return []
    cuts, start = [], since
    while start < until:
        end = min(start + longest, until)
        cuts.append((start, end))
        start = end
    return cuts


@dataclass(frozen=True, slots=True)
class Page:
    """One answered page: the conversations not seen earlier in this query, and where the page stood."""

    interval: tuple[datetime, datetime]
    number: int
    conversations: list[dict[str, Any]]
    rows: int  # rows the page held, repeats included
    total_hits: int  # conversations the interval holds, as the server counted them for this page


class AnalyticsApi(rest.Client):
    """Blocking calls of the details query; one instance may run several queries one after the other."""

    def __init__(
        self,
        *,
        api_url: str,
        tokens: TokenProvider,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (10.0, 60.0),
        page_size: int = PAGE_SIZE,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: Callable[[], Backoff] = lambda: Backoff(base=1.0, cap=60.0),
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(api_url=api_url, tokens=tokens, session=session, timeout=timeout)
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.new_backoff = backoff
        self.stop = stop or threading.Event()
        self.requests = 0

    # The query, page by page

    def pages(self, since: datetime, until: datetime) -> Iterator[Page]:
        """Every page of every interval of [since, until); each conversation is handed out once."""
        seen: set[str] = set()
        for interval in intervals(since, until):
            yield from self._interval_pages(interval, seen)

    def conversations(self, since: datetime, until: datetime) -> Iterator[dict[str, Any]]:
        for page in self.pages(since, until):
            yield from page.conversations

    def _interval_pages(self, interval: tuple[datetime, datetime], seen: set[str]) -> Iterator[Page]:
        number = 1
        while True:
            body = self.query_page(interval, number)
            rows = [c for c in body.get("conversations") or () if isinstance(c, dict)]
            hits = body.get("totalHits")
            total = hits if isinstance(hits, int) else len(rows)
            fresh = [c for c in rows if _first_sight(c, seen)]
            yield Page(interval=interval, number=number, conversations=fresh, rows=len(rows),
                       total_hits=total)
            if len(rows) < self.page_size or number * self.page_size >= total:
                return
            number += 1

    def query_page(self, interval: tuple[datetime, datetime], number: int) -> dict[str, Any]:
        """One page, retried while the platform fails transiently (up to `max_attempts` tries)."""
        body = {
            "interval": f"{iso(interval[0])}/{iso(interval[1])}",
            "order": "asc",
            "orderBy": "conversationStart",
            "paging": {"pageSize": self.page_size, "pageNumber": number},
        }
        backoff = self.new_backoff()
        while True:
            try:
                return self._post(body)
            except QueryInterrupted:
                raise
            except TransientError as exc:
                if backoff.attempts + 1 >= self.max_attempts:
                    raise TransientError(
                        f"analytics query for {body['interval']} page {number} still failing after "
                        f"{self.max_attempts} tries: {exc}", retry_after=exc.retry_after,
                    ) from exc
                self._wait(backoff.next_delay(exc.retry_after), reason=str(exc), attempt=backoff.attempts)

    def _wait(self, delay: float, *, reason: str, attempt: int) -> None:
        logger.warning("analytics: %s; retry %d in %.2fs", reason, attempt, delay)
        if self.stop.wait(delay):
            raise QueryInterrupted("analytics query stopped while waiting to retry")

    # One request

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """The page's JSON; a 401 gets one new token and one more try."""
        what = f"the analytics details query (POST {DETAILS_QUERY_PATH})"
        response = rest.renewing_once(lambda: self._request(body), tokens=self.tokens, what=what)
        return self._json(rest.checked(
            response, what=what,
            forbidden="the OAuth client's role needs analytics:conversationDetail:view for backfill",
        ))

    def _request(self, body: dict[str, Any]) -> requests.Response:
        self.requests += 1
        return self.send("POST", DETAILS_QUERY_PATH, json=body)

    def _json(self, response: requests.Response) -> dict[str, Any]:
        return rest.json_object(response, label=f"POST {DETAILS_QUERY_PATH}")


def _first_sight(conversation: dict[str, Any], seen: set[str]) -> bool:
    conversation_id = conversation.get("conversationId")
    if not isinstance(conversation_id, str) or not conversation_id:
        return True  # the normalizer keeps it as a reject, with its raw text
    if conversation_id in seen:
        return False
    seen.add(conversation_id)
    return True


