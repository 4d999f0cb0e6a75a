"""Post-call hooks: the registry (dotted paths from settings) and the built-in hooks.

A hook is a plain callable ``hook(conversation_id, summary, idempotency_key)``. It returns normally on
success, raises PermanentHookError when trying again cannot help (the delivery fails at once, error kept),
and raises anything else for a transient failure (retried with exponential backoff up to HOOK_MAX_ATTEMPTS).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from functools import cache
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import requests
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)

TRIGGERS = ("end", "wrapup")
# The environment variable that sets each trigger's list, named in configuration errors.
SETTING_OF_TRIGGER = {"end": "CONVERSATION_HOOKS_END", "wrapup": "CONVERSATION_HOOKS_WRAPUP"}

SIGNATURE_HEADER = "X-Monitor-Signature"
TIMESTAMP_HEADER = "X-Monitor-Timestamp"
IDEMPOTENCY_HEADER = "X-Monitor-Idempotency-Key"
# What replaces a webhook URL's secret parts in a stored error or a log line.
MASK = "***"
MAX_ANSWER_SCAN = 2000  # characters of an error answer searched for an echo of the URL
# The urllib3 loggers that write request paths or URLs (DEBUG request lines, a few warnings).
URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry", "urllib3.poolmanager")
# requests' errors for a URL it cannot post to at all: a configuration error, not worth a retry.
UNUSABLE_URL = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema)


class Hook(Protocol):
    def __call__(self, conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None: ...


class PermanentHookError(Exception):
    """Trying again cannot help (a 4xx answer, a bad configuration): the delivery fails without retries."""


class TransientHookError(Exception):
    """Worth trying again later (5xx, 429, timeouts, connection errors)."""


# -- the registry ------------------------------------------------------------------------------------


def hooks_for(trigger: str) -> list[str]:
    """The dotted paths configured for a trigger ("end" or "wrapup"), each checked to import."""
    paths = list(settings.CONVERSATION_HOOKS.get(trigger, []))
    for path in paths:
        resolve(path, trigger=trigger)
    return paths


def resolve(path: str, *, trigger: str = "") -> Hook:
    """The callable at a dotted path; a bad path is a configuration error naming the variable."""
    try:
        return _import_hook(path)
    except ImportError as exc:
        variable = SETTING_OF_TRIGGER.get(trigger, "CONVERSATION_HOOKS")
        raise ImproperlyConfigured(f"{variable}: cannot load the hook {path!r}: {exc}") from None


@cache
def _import_hook(path: str) -> Hook:
    hook = import_string(path)
    if not callable(hook):
        raise ImportError(f"{path} is not callable")
    return hook


def validate_configuration() -> None:
    """Raise ImproperlyConfigured for an unknown trigger or a hook path that does not import."""
    unknown = set(settings.CONVERSATION_HOOKS) - set(TRIGGERS)
    if unknown:
        raise ImproperlyConfigured(
            f"CONVERSATION_HOOKS: unknown trigger(s) {sorted(unknown)}; use {list(TRIGGERS)}"
        )
    for trigger in TRIGGERS:
        hooks_for(trigger)
    if "conversations.hooks.signed_webhook" in _all_paths() and not settings.HOOK_WEBHOOK_SECRET:
        raise ImproperlyConfigured("HOOK_WEBHOOK_SECRET is empty but the signed webhook hook is configured")


def _all_paths() -> set[str]:
    return {path for paths in settings.CONVERSATION_HOOKS.values() for path in paths}


@checks.register()
def hooks_configuration_check(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Run with every management command that checks (runserver, stream_events, migrate): fail at start."""
    try:
        validate_configuration()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="conversations.E101")]
    return []


# -- built-in hooks ----------------------------------------------------------------------------------


def log_conversation(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    """The demo's hook: one log line per delivery."""
    agents = ", ".join(agent["name"] or agent["user_id"] for agent in summary.get("agents", [])) or "-"
    logger.info(
        "post-call %s: conversation %s (%s %s) queue %s, agents %s, wrap-up %s, %s s long; key %s",
        summary.get("trigger"), conversation_id,
        summary.get("media_type") or "-", summary.get("direction") or "-",
        summary.get("queue", {}).get("name") or "-", agents, summary.get("wrapup", {}).get("name") or "-",
        summary.get("durations", {}).get("conversation_seconds"), idempotency_key[:12],
    )


def signed_webhook(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    """POST the summary as JSON to every URL in HOOK_WEBHOOK_URLS, signed with HOOK_WEBHOOK_SECRET.

    A retry posts to every URL again, with the same idempotency key: receivers dedupe on it. Logs and errors
    name a URL by its scheme, host and port only (see loggable).
    """
    urls = settings.HOOK_WEBHOOK_URLS
    if not urls:
        raise PermanentHookError("HOOK_WEBHOOK_URLS is empty: the signed webhook has nowhere to post")
    if not settings.HOOK_WEBHOOK_SECRET:
        raise PermanentHookError("HOOK_WEBHOOK_SECRET is empty: the signed webhook will not post unsigned")
    body = webhook_body(conversation_id, summary, idempotency_key)
    for url in urls:
        post_signed(url, body, idempotency_key=idempotency_key)


def webhook_body(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> bytes:
    envelope = {
        "type": f"conversation.{summary.get('trigger', '')}",
        "conversation_id": conversation_id,
        "idempotency_key": idempotency_key,
        "summary": summary,
    }
    return orjson.dumps(envelope)


def sign(body: bytes, *, timestamp: int, secret: str) -> str:
    """The signature header value: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">."""
    message = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def post_signed(url: str, body: bytes, *, idempotency_key: str) -> None:
    install_log_filter()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "genesys-conversation-monitor",
        SIGNATURE_HEADER: sign(body, timestamp=timestamp, secret=settings.HOOK_WEBHOOK_SECRET),
        TIMESTAMP_HEADER: str(timestamp),
        IDEMPOTENCY_HEADER: idempotency_key,
    }
    timeout = (settings.HOOK_WEBHOOK_CONNECT_TIMEOUT, settings.HOOK_WEBHOOK_TIMEOUT)
    where = loggable(url)
    # Every message below becomes a log line and the delivery's last_error: it names the URL by `where` only,
    # and none keeps the exception it came from (requests puts the whole URL in its messages).
    try:
        # A redirect is not followed: requests would turn the POST into a body-less GET.
        response = requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.Timeout as exc:
        raise TransientHookError(f"webhook {where}: timed out ({type(exc).__name__})") from None
    except requests.ConnectionError as exc:
        reason = hidden(connection_reason(exc), url)
        raise TransientHookError(f"webhook {where}: connection failed: {reason}") from None
    except UNUSABLE_URL as exc:
        raise PermanentHookError(f"webhook {where}: not a URL to post to ({type(exc).__name__})") from None
    except requests.RequestException as exc:
        raise TransientHookError(f"webhook {where}: the request failed ({type(exc).__name__})") from None
    classify_response(url, response)


def classify_response(url: str, response: requests.Response) -> None:
    status = response.status_code
    if status < 300:
        logger.info("webhook %s accepted the delivery (%s)", loggable(url), status)
        return
    # Masked before it is cut: a receiver may echo the request ("Cannot POST /services/T000/B000/XXXX").
    answer = hidden(response.text[:MAX_ANSWER_SCAN], url)[:200]
    detail = f"webhook {loggable(url)} answered {status}: {answer}"
    if status == 429 or status >= 500:
        raise TransientHookError(detail)
    raise PermanentHookError(detail)


# -- keeping webhook URLs out of logs and stored errors ----------------------------------------------
# A webhook URL's path or query may be its secret (Slack: https://hooks.slack.com/services/T000/B000/XXXX),
# its user info a password: only the scheme, host and port are ever logged or stored.

def loggable(url: str) -> str:
    """A webhook URL as it may be logged: scheme, host and port; no user info, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6: urlsplit dropped the brackets
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a port number: requests refuses the URL anyway
        port = ""
    return f"{parts.scheme}://{host}{port}"


def hidden(text: str, url: str) -> str:
    """`text` with the URL's user info, path and query masked wherever they appear in it."""
    for secret in secret_parts(url):
        text = text.replace(secret, MASK)
    return text


def secret_parts(url: str) -> list[str]:
    """The parts of a webhook URL that may carry a token, longest first (a path contains shorter pieces)."""
    parts = urlsplit(url)
    candidates = [parts.path, parts.query, parts.username or "", parts.password or ""]
    return sorted((part for part in candidates if len(part) > 1), key=len, reverse=True)


class WebhookSecretFilter(logging.Filter):
    """Masks the configured webhook URLs' secret parts in a urllib3 record (its DEBUG line of every request
    carries the path) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = message
        for url in settings.HOOK_WEBHOOK_URLS:
            masked = hidden(masked, url)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


@cache
def install_log_filter() -> None:
    """Once per process, before the first webhook request."""
    log_filter = WebhookSecretFilter()
    for name in URLLIB3_LOGGERS:
        logging.getLogger(name).addFilter(log_filter)


def connection_reason(exc: requests.ConnectionError) -> str:
    """The low-level reason (refused, reset, DNS) without the request path, which may carry a token."""
    wrapped = exc.args[0] if exc.args else None
    reason = getattr(wrapped, "reason", None)
    return f"{type(reason).__name__}: {reason}" if reason is not None else type(exc).__name__
