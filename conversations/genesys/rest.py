"""How every Genesys REST call reads its answer: one token renewal on a 401, then 2xx passes, 403 and other
4xx are fatal, 408/429/5xx are transient (with Retry-After). Shared by the SSE, Notifications and analytics
clients so that they classify errors the same way."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import requests

from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import parse_retry_after
from conversations.genesys.errors import FatalSourceError, TransientError, error_detail, short_reason

logger = logging.getLogger(__name__)

Detail = Callable[[requests.Response], str]


def body_detail(response: requests.Response) -> str:
    return error_detail(response.content or b"")


def renewing_once(
    send: Callable[[], requests.Response], *, tokens: TokenProvider, what: str, detail: Detail = body_detail
) -> requests.Response:
    """Send; on a 401 renew the token and send once more. A 401 right after a renewal is fatal."""
    response = send()
    if response.status_code != 401:
        return response
    logger.warning("%s answered 401 (%s); renewing the token and retrying once", what, detail(response))
    tokens.invalidate()
    response = send()
    if response.status_code == 401:
        raise FatalSourceError(
            f"Genesys refused a freshly issued token for {what} (401 {detail(response)}); "
            "check the OAuth client, the region and the API URL"
        )
    return response


def checked(
    response: requests.Response, *, what: str, forbidden: str, detail: Detail = body_detail,
    accept: Callable[[int], bool] = lambda status: 200 <= status < 300,
) -> requests.Response:
    """The response when `accept`ed; else the error, classified: transient (retried) or fatal (one line)."""
    status = response.status_code
    if accept(status):
        return response
    text = detail(response)
    if status in (408, 429) or status >= 500:
        raise TransientError(f"{what} answered {status} {text}",
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status == 403:
        raise FatalSourceError(f"Genesys refused {what} (403 {text}); {forbidden}")
    raise FatalSourceError(f"{what} answered {status} {text}; check the API URL and the request")


def request(
    session: requests.Session, method: str, url: str, *, tokens: TokenProvider, timeout: Any, label: str,
    **kwargs: Any,
) -> requests.Response:
    """One authorized JSON call; a network failure is transient."""
    headers = {"Authorization": f"Bearer {tokens.token()}", "Accept": "application/json"}
    try:
        return session.request(method, url, headers=headers, timeout=timeout, **kwargs)
    except requests.RequestException as exc:
        raise TransientError(f"{label} failed ({short_reason(exc)})") from exc


def json_object(response: requests.Response, *, label: str) -> dict[str, Any]:
    """The answer's JSON object ({} for another JSON value); a body that is not JSON is transient."""
    try:
        body = response.json()
    except ValueError:
        raise TransientError(f"{label} answered {response.status_code} without a JSON body") from None
    return body if isinstance(body, dict) else {}


class Client:
    """What a Genesys REST client holds: the API URL, the tokens, a session (closed with the client when the
    client made it) and the timeouts; `send` is one authorized call through request()."""

    def __init__(
        self, *, api_url: str, tokens: TokenProvider, session: requests.Session | None, timeout: tuple[float, float]
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.tokens = tokens
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._timeout = timeout

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return request(self._session, method, self.api_url + path, tokens=self.tokens, timeout=self._timeout,
                       label=f"{method} {path}", **kwargs)
