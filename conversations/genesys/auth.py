"""OAuth client-credentials tokens for the Genesys Cloud API, cached and renewed before they expire.

Genesys issues no refresh token: a new token is requested shortly before `expires_in` runs out, and once more
after the API answers 401. The token and the client secret never reach a log line or an exception message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from conversations.genesys.backoff import parse_retry_after
from conversations.genesys.errors import AuthError, TransientError, error_detail, short_reason

logger = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/token"


class TokenProvider:
    """Hands out a valid bearer token; fetches a new one only when the cached one is about to expire."""

    def __init__(
        self,
        *,
        login_url: str,
        client_id: str,
        client_secret: str,
        session: requests.Session | None = None,
        margin_seconds: float = 60.0,
        timeout: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not client_id or not client_secret:
            raise AuthError("Genesys OAuth client id and secret must both be set")
        self.url = login_url.rstrip("/") + TOKEN_PATH
        self.client_id = client_id
        self._secret = client_secret
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._margin = margin_seconds
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0
        self.token_requests = 0

    def token(self) -> str:
        """A token valid for a while yet; raises AuthError (fatal) or TransientError (retry later)."""
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._token, self._renew_at = self._fetch()
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token: the API refused it (401), so the next `token()` asks for a new one."""
        with self._lock:
            self._token = None

    def close(self) -> None:
        """Release the connection pool, when the provider made its own session."""
        if self._owns_session:
            self._session.close()

    def __repr__(self) -> str:  # the token and the secret stay out of logs and tracebacks
        cached = "cached" if self._token else "none"
        return f"TokenProvider(url={self.url!r}, client_id={self.client_id!r}, token={cached})"

    def _fetch(self) -> tuple[str, float]:
        started = self._clock()
        self.token_requests += 1
        response = self._post()
        self._raise_for_status(response)
        token, lifetime = self._parse(response)
        logger.info(
            "genesys auth: new token for client %s, expires in %ss (token request #%s)",
            self.client_id,
            lifetime,
            self.token_requests,
        )
        return token, started + self._renew_after(lifetime)

    def _post(self) -> requests.Response:
        try:
            return self._session.post(
                self.url,
                auth=(self.client_id, self._secret),
                data={"grant_type": "client_credentials"},
                headers={"Accept": "application/json"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise TransientError(f"token endpoint {self.url} unreachable ({short_reason(exc)})") from exc

    def _raise_for_status(self, response: requests.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        detail = error_detail(response.content)
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise TransientError(
                f"token endpoint {self.url} answered {status} {detail}", retry_after=retry_after
            )
        raise AuthError(
            f"Genesys refused OAuth client {self.client_id!r} at {self.url} ({status} {detail}); "
            "check the client id, secret and region"
        )

    def _parse(self, response: requests.Response) -> tuple[str, float]:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(
                f"token endpoint {self.url} answered 200 without an access_token "
                f"for client {self.client_id!r}; "
                "check the login URL"
            )
        return token, _lifetime(body.get("expires_in"))

    def _renew_after(self, lifetime: float) -> float:
        """Renew `margin` seconds early; a lifetime shorter than twice the margin is renewed halfway."""
        return lifetime - min(self._margin, lifetime / 2)


def _lifetime(expires_in: Any) -> float:
    """Seconds the token lives; without a usable `expires_in`, keep it until the API answers 401."""
    try:
        lifetime = float(expires_in)
    except (TypeError, ValueError):
        logger.warning(
            "genesys auth: token answer has no usable expires_in (%r); renewing on 401", expires_in
        )
        return math.inf
    return math.inf if math.isnan(lifetime) else max(lifetime, 0.0)
