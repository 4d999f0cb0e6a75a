"""The read-only JSON API for BI tools and other systems.

    GET /api/conversations/?state=&media=&direction=&queue=&agent=&wrapup=&from=&to=&q=&limit=&cursor=
    GET /api/conversations/<conversation id>/

Authentication: a staff session (the browser), or `Authorization: Token <key>` with a key an admin created
(only its SHA-256 is stored). A token grants what its user's session grants: an active staff user reads, a
user who is not (or no longer) staff gets 403, an unknown token or one of a deactivated user 401. Any method
but GET and HEAD is a JSON 405 with `Allow: GET, HEAD`. Lists are newest first, paginated by an opaque cursor:
follow `next` until it is null; there is no total count (it would cost a full scan on a large table).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from conversations import selectors
from conversations.consumers import can_watch
from conversations.models import ApiToken, Conversation, Event, HookDelivery, Participant

logger = logging.getLogger(__name__)

View = Callable[..., HttpResponse]
TOKEN_TOUCH_EVERY = timedelta(minutes=1)  # last_used_at is a hint, not an audit log: one UPDATE a minute
SAFE_METHODS = ("GET", "HEAD")  # the API is read-only: everything else, OPTIONS included, is a JSON 405


def token_of(header: str) -> ApiToken | None:
    """The token in an `Authorization: Token <key>` header, if it exists and its user is active, else None."""
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "token" or not key:
        return None
    digest = hashlib.sha256(key.encode()).hexdigest()
    token = ApiToken.objects.select_related("user").filter(key_hash=digest).first()
    if token is None:
        logger.info("API request with an unknown token (prefix %s)", key[:4])
        return None
    if not token.user.is_active:
        logger.info("API token %s refused: its user %s is deactivated", token.prefix, token.user)
        return None
    return token


def touch_token(token: ApiToken) -> None:
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= TOKEN_TOUCH_EVERY:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)


def refusal(request: HttpRequest) -> JsonResponse | None:
    """Why this request may not read the API, or None. A token grants exactly what its user's session grants,
    read from the user's row on every request: demoting or deactivating the user stops the token at once."""
    header = request.headers.get("Authorization", "")
    if header:
        token = token_of(header)
        if token is None:
            return _unauthorized("the token is not valid")
        if not can_watch(token.user):
            logger.info("API token %s refused: its user %s may not watch conversations", token.prefix, token.user)
            return JsonResponse({"error": "the token's user is not staff"}, status=403)
        touch_token(token)
        request.user = token.user
    elif not request.user.is_authenticated:
        return _unauthorized("send Authorization: Token <key>, or log in")
    elif not can_watch(request.user):
        return JsonResponse({"error": "staff only"}, status=403)
    return None


def api_view(view: View) -> View:
    """GET/HEAD only; a token, or a staff session; JSON errors with the right status."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in SAFE_METHODS:
            return _not_allowed(request)
        if (refused := refusal(request)) is not None:
            return refused
        try:
            return view(request, *args, **kwargs)
        except selectors.InvalidFilter as exc:
            return JsonResponse({"error": str(exc)}, status=400)

    # Exempt from CSRF so that a POST is answered by the JSON 405 above, not by Django's HTML CSRF page.
    # Safe: CSRF protects requests that change something, and these views answer only GET and HEAD, which
    # change nothing (the token's last_used_at hint aside); every other method is refused before any work.
    return csrf_exempt(never_cache(wrapped))


def _not_allowed(request: HttpRequest) -> JsonResponse:
    response = JsonResponse({"error": f"{request.method} is not allowed: the API is read-only"}, status=405)
    response["Allow"] = ", ".join(SAFE_METHODS)
    return response


def _unauthorized(message: str) -> JsonResponse:
    response = JsonResponse({"error": message}, status=401)
    response["WWW-Authenticate"] = 'Token realm="api"'
    return response


@api_view
def conversation_list(request: HttpRequest) -> JsonResponse:
    filters = selectors.parse_filters(request.GET)
    limit = selectors.page_size(request.GET.get("limit"), default=100)
    page = selectors.conversation_page(selectors.conversations_matching(filters),
                                       cursor=request.GET.get("cursor"), limit=limit)
    return JsonResponse({
        "results": [conversation_json(row) for row in page.items],
        "next_cursor": page.next_cursor,
        "next": _next_url(request, page.next_cursor),
    })


def _next_url(request: HttpRequest, cursor: str | None) -> str | None:
    if cursor is None:
        return None
    params = {k: v for k, v in request.GET.items() if k != "cursor"}
    return request.build_absolute_uri(f"{request.path}?{urlencode({**params, 'cursor': cursor})}")


@api_view
def conversation_detail(request: HttpRequest, conversation_id: str) -> JsonResponse:
    conversation = Conversation.objects.filter(conversation_id=conversation_id).first()
    if conversation is None:
        return JsonResponse({"error": "no such conversation"}, status=404)
    return JsonResponse({
        **conversation_json(conversation),
        "participants": [participant_json(p) for p in selectors.conversation_participants(conversation)],
        "events": [event_json(e) for e in selectors.conversation_events(conversation)],
        "hook_deliveries": [hook_json(h) for h in selectors.conversation_hook_deliveries(conversation)],
    })


# -- representations ---------------------------------------------------------------------------------------
def conversation_json(c: Conversation) -> dict[str, Any]:
    return {
        "conversation_id": c.conversation_id, "state": c.state, "media_type": c.media_type,
        "direction": c.direction, "queue_id": c.queue_id, "queue_name": c.queue_name, "agent_id": c.agent_id,
        "agent_name": c.agent_name, "ani": c.ani, "dnis": c.dnis, "wrapup_code": c.wrapup_code,
        "wrapup_name": c.wrapup_name, "wrapup_notes": c.wrapup_notes, "started_at": _iso(c.started_at),
        "ended_at": _iso(c.ended_at), "wrapped_up_at": _iso(c.wrapped_up_at),
        "last_event_at": _iso(c.last_event_at),
    }


def participant_json(p: Participant) -> dict[str, Any]:
    return {
        "participant_id": p.participant_id, "purpose": p.purpose, "user_id": p.user_id, "name": p.name,
        "queue_id": p.queue_id, "connected_at": _iso(p.connected_at), "ended_at": _iso(p.ended_at),
        "wrapup_code": p.wrapup_code, "wrapup_notes": p.wrapup_notes, "acw_seconds": p.acw_seconds,
    }


def event_json(e: Event) -> dict[str, Any]:
    return {
        "event_type": e.event_type, "kind": e.kind, "occurred_at": _iso(e.occurred_at),
        "received_at": _iso(e.received_at), "source": e.source, "sse_id": e.sse_id, "payload": e.payload,
    }


def hook_json(h: HookDelivery) -> dict[str, Any]:
    return {
        "hook": h.hook, "trigger": h.trigger, "status": h.status, "attempts": h.attempts,
        "created_at": _iso(h.created_at), "finished_at": _iso(h.finished_at), "last_error": h.last_error,
    }


def _iso(moment: Any) -> str | None:
    return moment.isoformat() if moment else None

