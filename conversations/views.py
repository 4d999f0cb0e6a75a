"""The web pages: the live dashboard (and its JSON state), the history, one conversation, the CSV export.

Every page is for logged-in staff: anonymous visitors are sent to the login page, other users get 403.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import timedelta
from itertools import islice
from typing import Any
from urllib.parse import quote, urlencode

from asgiref.sync import sync_to_async
from django.contrib.auth.views import redirect_to_login
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from conversations import realtime, selectors
from conversations.consumers import can_watch
from conversations.events import ConversationState
from conversations.models import Conversation, Event

logger = logging.getLogger(__name__)

View = Callable[..., HttpResponse]
EXPORT_LINES_PER_WRITE = 500
FILTER_PARAMS = ("state", "media", "direction", "queue", "agent", "wrapup", "q", "from", "to")


def staff_required(view: View) -> View:
    """Anonymous -> the login page; logged in but not staff -> the 403 page.

    The 403 is answered, not raised: a raised PermissionDenied is logged with its traceback, and a refusal is
    expected, not an error. Django's request logger still writes its one "Forbidden: <path>" WARNING line.
    """

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not can_watch(request.user):
            return render(request, "403.html", status=403)
        return view(request, *args, **kwargs)

    return wrapped


def staff_required_json(view: View) -> View:
    """For the pages' own JSON: a refusal the page's script can read (no redirect to an HTML login)."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can_watch(request.user):
            status = 403 if request.user.is_authenticated else 401
            return JsonResponse({"error": "log in as staff", "login": reverse("conversations:login")}, status=status)
        return view(request, *args, **kwargs)

    return wrapped


# -- live --------------------------------------------------------------------------------------------------
@require_safe
@staff_required
def live(request: HttpRequest) -> HttpResponse:
    queue_id = request.GET.get("queue", "").strip()
    socket_path = f"/ws/live/queues/{quote(queue_id, safe='')}/" if queue_id else "/ws/live/"
    state_url = reverse("conversations:live-state") + (f"?{urlencode({'queue': queue_id})}" if queue_id else "")
    wallboard = request.GET.get("wallboard") == "1"
    return render(request, "conversations/live.html", {
        "queue_id": queue_id,
        "queue_name": _queue_name(queue_id),
        "wallboard": wallboard,
        "live_config": {
            "socketPath": socket_path,
            "stateUrl": state_url,
            "healthUrl": reverse("conversations:live-health"),
            "queueId": queue_id,
            "loginUrl": reverse("conversations:login"),
            "detailUrlTemplate": reverse("conversations:conversation-detail", args=["CONVERSATION_ID"]),
            "queueUrlTemplate": reverse("conversations:live") + ("?wallboard=1&queue=QUEUE_ID" if wallboard
                                                                 else "?queue=QUEUE_ID"),
        },
    })


def _queue_name(queue_id: str) -> str:
    if not queue_id:
        return ""
    row = Conversation.objects.filter(queue_id=queue_id).exclude(queue_name="").order_by("-id").first()
    return row.queue_name if row else queue_id


@require_safe
@never_cache
@staff_required_json
def live_state(request: HttpRequest) -> JsonResponse:
    """Everything the live page shows, read fresh: loaded on every (re)connect and every minute."""
    now = timezone.now()
    queue_id = request.GET.get("queue", "").strip()
    rows = selectors.live_conversations(queue_id=queue_id, now=now)
    return JsonResponse({
        "server_time": now.isoformat(),
        "queue_id": queue_id,
        "conversations": [realtime.snapshot(row) for row in rows],
        "today": selectors.today_counts(queue_id=queue_id, now=now),
        "events_last_minute": selectors.events_received_since(now - timedelta(minutes=1)),
        "health": selectors.stream_health(now=now),
    })


@require_safe
@never_cache
@staff_required_json
def live_health(request: HttpRequest) -> JsonResponse:
    return JsonResponse(selectors.stream_health())


# -- history -----------------------------------------------------------------------------------------------
@require_safe
@staff_required
def conversation_list(request: HttpRequest) -> HttpResponse:
    error = ""
    page = selectors.Page()
    try:
        filters = selectors.parse_filters(request.GET)
        limit = selectors.page_size(request.GET.get("limit"))
        qs = selectors.conversations_matching(filters)
        page = selectors.conversation_page(qs, cursor=request.GET.get("cursor"), limit=limit)
    except selectors.InvalidFilter as exc:
        error = str(exc)
    params = _filter_params(request)
    return render(request, "conversations/list.html", status=400 if error else 200, context={
        "page": page,
        "error": error,
        "params": params,
        "query": _query(params),
        "next_query": _query({**params, "cursor": page.next_cursor}) if page.next_cursor else "",
        "first_page": not request.GET.get("cursor"),
        "states": [s.value for s in ConversationState],
        "media_types": sorted(selectors.MEDIA_TYPES),
        "directions": sorted(selectors.DIRECTIONS),
        "choices": _choices_with(params),
    })


def _choices_with(params: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Recent values, plus the one filtered on even when it is older (so the form shows it selected)."""
    choices = selectors.filter_choices()
    for key, param in (("queues", "queue"), ("agents", "agent"), ("wrapups", "wrapup")):
        value = params.get(param)
        if value and value not in dict(choices[key]):
            choices[key].append((value, value))
    return choices


def _filter_params(request: HttpRequest) -> dict[str, str]:
    return {name: request.GET.get(name, "").strip() for name in FILTER_PARAMS if request.GET.get(name, "").strip()}


def _query(params: dict[str, Any]) -> str:
    return urlencode({k: v for k, v in params.items() if v})


@require_safe
@staff_required
def conversation_detail(request: HttpRequest, conversation_id: str) -> HttpResponse:
    conversation = get_object_or_404(Conversation, conversation_id=conversation_id)
    return render(request, "conversations/detail.html", {
        "conversation": conversation,
        "events": [_with_pretty_payload(event) for event in selectors.conversation_events(conversation)],
        "participants": list(selectors.conversation_participants(conversation)),
        "hook_deliveries": list(selectors.conversation_hook_deliveries(conversation)),
        "socket_path": f"/ws/live/conversations/{quote(conversation.conversation_id, safe='')}/",
    })


def _with_pretty_payload(event: Event) -> Event:
    event.pretty_payload = json.dumps(event.payload, indent=2, ensure_ascii=False, sort_keys=True)
    return event


# -- CSV export --------------------------------------------------------------------------------------------
@require_safe
@staff_required
def conversation_export(request: HttpRequest) -> HttpResponse:
    """The filtered set, streamed row by row: memory stays flat whatever the number of rows."""
    try:
        qs = selectors.conversations_matching(selectors.parse_filters(request.GET))
    except selectors.InvalidFilter as exc:
        return HttpResponse(f"{exc}\n", status=400, content_type="text/plain; charset=utf-8")
    lines = csv_lines(selectors.export_rows(qs))
    # Under ASGI a plain iterator would be read whole into memory before sending; hand it an async one.
    content = _in_worker_thread(lines) if isinstance(request, ASGIRequest) else lines
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="conversations-{stamp}.csv"'
    logger.info("CSV export of conversations started by %s with filters %s", request.user, _filter_params(request))
    return response


class _Line:
    """csv.writer target that hands back what it was given instead of storing it."""

    def write(self, value: str) -> str:
        return value


# A cell that starts like a formula is run by spreadsheets; a phone number (+353 ...) is left alone.
_FORMULA = re.compile(r"^[=+\-@\t\r]")
_NUMBER = re.compile(r"^[+-]?[\d ().-]+$")


def _cell(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, str) and _FORMULA.match(value) and not _NUMBER.match(value):
        return "'" + value
    return value


def csv_lines(rows: Iterable[tuple[Any, ...]]) -> Iterator[str]:
    """A header, then the rows, joined into strings of EXPORT_LINES_PER_WRITE lines."""
    writer = csv.writer(_Line())
    yield writer.writerow(selectors.EXPORT_FIELDS)
    rows = iter(rows)
    while chunk := list(islice(rows, EXPORT_LINES_PER_WRITE)):
        yield "".join(writer.writerow([_cell(v) for v in row]) for row in chunk)


async def _in_worker_thread(lines: Iterator[str]) -> AsyncIterator[str]:
    """Pull each chunk in Django's sync thread (the database cursor lives there), one chunk at a time."""
    take = sync_to_async(lambda: next(lines, None), thread_sensitive=True)
    while (chunk := await take()) is not None:
        yield chunk
