"""How a Genesys source fails: transient (retry with backoff) or fatal (stop with one clear line).

Messages are written for the operator reading a log line. They never carry a token or a client secret.
"""

from __future__ import annotations

import json

# Enough of an error body to show the server's own message, never a whole HTML page.
_DETAIL_SHOWN = 200


class SourceError(Exception):
    """Base class of every error a Genesys source raises."""


class TransientError(SourceError):
    """The platform or the network failed for now: wait, then try again."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        # Seconds the server asked us to wait (Retry-After), or None.
        self.retry_after = retry_after


class FatalSourceError(SourceError):
    """Retrying cannot help (bad credentials, missing permission, wrong URL): stop and tell the operator."""


class AuthError(FatalSourceError):
    """The OAuth client was refused: wrong client id or secret, or a client without the right grant."""


def error_detail(body: bytes) -> str:
    """A short, single-line description of an error answer's body: the server's message if it sent one."""
    text = body.decode("utf-8", errors="replace").strip()
    message = _json_message(text) or text
    return " ".join(message.split())[:_DETAIL_SHOWN]


def _json_message(text: str) -> str:
    """Genesys error bodies say what went wrong in `message` (API) or `description` (login)."""
    try:
        data = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    parts = [str(data[key]) for key in ("error", "message", "description") if data.get(key)]
    return ": ".join(parts)


def short_reason(exc: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, on one line ("ConnectionResetError: ...")."""
    reason = exc
    for _ in range(8):  # these errors nest a few levels deep; never loop forever on a cycle
        inner = _inner_exception(reason)
        if inner is None:
            break
        reason = inner
    text = " ".join(str(reason).split())
    return f"{type(reason).__name__}: {text}"[:_DETAIL_SHOWN] if text else type(reason).__name__


def _inner_exception(exc: BaseException) -> BaseException | None:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        return reason
    for arg in exc.args:
        if isinstance(arg, BaseException):
            return arg
    return None
