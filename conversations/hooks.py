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
from urllib.parse import urlsplit, urlunsplit

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

    A retry posts to every URL again, with the same idempotency key: receivers dedupe on it.
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
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "genesys-conversation-monitor",
        SIGNATURE_HEADER: sign(body, timestamp=timestamp, secret=settings.HOOK_WEBHOOK_SECRET),
        TIMESTAMP_HEADER: str(timestamp),
        IDEMPOTENCY_HEADER: idempotency_key,
    }
    timeout = (settings.HOOK_WEBHOOK_CONNECT_TIMEOUT, settings.HOOK_WEBHOOK_TIMEOUT)
    try:
        # A redirect is not followed: requests would turn the POST into a body-less GET.
        response = requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.Timeout as exc:
        raise TransientHookError(f"webhook {loggable(url)}: timed out ({type(exc).__name__})") from None
    except requests.ConnectionError as exc:
        reason = connection_reason(exc)
        raise TransientHookError(f"webhook {loggable(url)}: connection failed: {reason}") from None
    classify_response(loggable(url), response)


def classify_response(url: str, response: requests.Response) -> None:
    status = response.status_code
    if status < 300:
        logger.info("webhook %s accepted the delivery (%s)", url, status)
        return
    detail = f"webhook {url} answered {status}: {response.text[:200]}"
    if status == 429 or status >= 500:
        raise TransientHookError(detail)
    raise PermanentHookError(detail)


def loggable(url: str) -> str:
    """A webhook URL without credentials or query string, which may carry a token."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def connection_reason(exc: requests.ConnectionError) -> str:
    """The low-level reason (refused, reset, DNS) without the request path, which may carry a token."""
    wrapped = exc.args[0] if exc.args else None
    reason = getattr(wrapped, "reason", None)
    return f"{type(reason).__name__}: {reason}" if reason is not None else type(exc).__name__
