"""The operators' console: conversations, raw events, rejects, hook deliveries, stream health and API tokens.

Every changelist stays cheap on tables of millions of rows:
* no COUNT(*): `NoCountPaginator` reads one row past the page, `show_full_result_count = False`;
* no "show all" of a multi-page result, no facet counts;
* filter options never come from `SELECT DISTINCT` over the table: choice fields list their choices, other
  columns hop through their index (`IndexedValuesFilter`), the date hierarchy is bounded by two index probes;
* search is exact, on indexed columns; sorting only on indexed columns;
* related rows come with the page (`list_select_related`, subqueries), never one query per row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import ShowFacets
from django.contrib.admin.utils import unquote
from django.contrib.auth.models import User
from django.db import DatabaseError, connections, router
from django.db.models import Count, Model, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from conversations.consumers import can_watch
from conversations.models import (
    ApiToken,
    Conversation,
    Event,
    HookDelivery,
    Participant,
    RejectedEvent,
    StreamCheckpoint,
    StreamConnection,
    WorkerHeartbeat,
)
from conversations.paginators import ConsoleChangeList, NoCountPaginator, requested_page
from conversations.reprocess import ReprocessResult, reprocess_pending

logger = logging.getLogger(__name__)

MAX_FILTER_OPTIONS = 100  # options a filter offers at most (the first ones in index order)
EVENTS_ON_CONVERSATION_PAGE = 200  # newest events shown on a conversation's page; the rest are one link away
REPROCESS_PER_ACTION = 1000  # rejects one "reprocess" click handles, so the request stays short
RERUN_PER_ACTION = 1000  # hook deliveries one "re-run" click handles
SEARCH_HITS = 1000  # a search value matching more rows than this is common: see newest_first_matches
WORKER_STALE_AFTER = timedelta(seconds=60)  # a worker heartbeat older than this is a dead or stuck worker


# --- Rendering helpers --------------------------------------------------------------------------------------

def pretty_json_text(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def pretty_json(value: object) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", pretty_json_text(value))


def pre(text: str) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", text)


def shorten(text: str, length: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 1] + "…"


def format_duration(delta: timedelta | None) -> str:
    """4m 12s, 1h 02m 03s, 2d 3h; an empty or negative span is shown as a dash."""
    if delta is None or delta < timedelta(0):
        return "—"
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def ago(moment: datetime | None) -> str:
    return "never" if moment is None else f"{format_duration(datetime.now(UTC) - moment)} ago"


def admin_link(obj: Model, text: str) -> str:
    opts = obj._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text)


def conversation_search_link(conversation_id: str) -> str:
    """Link to a conversation by its Genesys id, without reading it (an exact, indexed search)."""
    if not conversation_id:
        return "—"
    url = reverse("admin:conversations_conversation_changelist") + "?" + urlencode({"q": conversation_id})
    return format_html('<a href="{}">{}</a>', url, conversation_id)


# --- Filters whose options never scan the table -------------------------------------------------------------

def distinct_indexed_values(model: type[Model], field: str, *, label_field: str | None = None,
                            limit: int = MAX_FILTER_OPTIONS) -> list[tuple[str, str]]:
    """The first `limit` distinct non-empty values of an indexed column (in index order), with a label
    for each, sorted by label.

    A loose index scan: a recursive query hops from each value to the next larger one through the index, so
    the cost is one index probe per distinct value, not a read of every row (as `SELECT DISTINCT` would be).
    """
    connection = connections[router.db_for_read(model)]
    qn = connection.ops.quote_name
    table, column = qn(model._meta.db_table), qn(model._meta.get_field(field).column)
    label = "hop.value"
    if label_field:
        label_column = qn(model._meta.get_field(label_field).column)
        label = (f"(SELECT {label_column} FROM {table} WHERE {column} = hop.value AND {label_column} <> '' "
                 f"LIMIT 1)")
    sql = f"""
        WITH RECURSIVE hop(value, n) AS (
            SELECT (SELECT {column} FROM {table} WHERE {column} > '' ORDER BY {column} LIMIT 1), 1
            UNION ALL
            SELECT (SELECT {column} FROM {table} WHERE {column} > hop.value ORDER BY {column} LIMIT 1),
                   hop.n + 1
            FROM hop WHERE hop.value IS NOT NULL AND hop.n < %s
        )
        SELECT hop.value, {label} FROM hop WHERE hop.value IS NOT NULL"""
    with connection.cursor() as cursor:
        cursor.execute(sql, [limit])
        rows = cursor.fetchall()
    return sorted(((value, text or value) for value, text in rows), key=lambda option: option[1].casefold())


class IndexedValuesFilter(admin.SimpleListFilter):
    """Filter on an indexed column; the options are its distinct values, read by `distinct_indexed_values`."""

    field: str = ""
    label_field: str | None = None

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        options = distinct_indexed_values(model_admin.model, self.field, label_field=self.label_field,
                                          limit=MAX_FILTER_OPTIONS)
        chosen = self.value()
        if chosen and chosen not in {value for value, _ in options}:
            options.append((chosen, chosen))  # keep a chosen value visible even beyond the first options
        return options

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(**{self.field: self.value()}) if self.value() else queryset


def indexed_values_filter(field: str, *, title: str,
                          label_field: str | None = None) -> type[IndexedValuesFilter]:
    attrs = {"field": field, "label_field": label_field, "title": title, "parameter_name": field}
    return type(f"{field.title().replace('_', '')}Filter", (IndexedValuesFilter,), attrs)


class TriggerFilter(admin.SimpleListFilter):
    title = "trigger"
    parameter_name = "trigger"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("end", "conversation end"), ("wrapup", "wrap-up")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(trigger=self.value()) if self.value() else queryset


class PendingRejectFilter(admin.SimpleListFilter):
    title = "reprocessed"
    parameter_name = "reprocessed"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("no", "pending"), ("yes", "reprocessed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("no", "yes"):
            return queryset.filter(reprocessed_at__isnull=self.value() == "no")
        return queryset


class OpenConnectionFilter(admin.SimpleListFilter):
    title = "connection"
    parameter_name = "open"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "open"), ("no", "closed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in ("no", "yes"):
            return queryset.filter(disconnected_at__isnull=self.value() == "yes")
        return queryset


# --- Base admins --------------------------------------------------------------------------------------------

class ConsoleAdmin(admin.ModelAdmin):
    """Changelists that cost the same on a hundred rows and on a million."""

    paginator = NoCountPaginator
    list_per_page = 100
    show_full_result_count = False
    show_facets = ShowFacets.NEVER  # facet counts are one COUNT per filter option

    @property
    def list_max_show_all(self) -> int:  # type: ignore[override]
        # "Show all" only for what fits on one page: the count of a multi-page list is only a lower bound.
        return self.list_per_page

    def get_paginator(self, request: HttpRequest, queryset: QuerySet, per_page: int, orphans: int = 0,
                      allow_empty_first_page: bool = True) -> NoCountPaginator:
        return NoCountPaginator(queryset, per_page, allow_empty_first_page=allow_empty_first_page,
                                number=requested_page(request))

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ConsoleChangeList]:
        return ConsoleChangeList


class ReadOnlyAdmin(ConsoleAdmin):
    """Stored facts: never added, edited or deleted from the admin."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


def phone_variants(term: str) -> list[str]:
    """ANI/DNIS are stored as `tel:+353...`; an operator may paste the number with or without the scheme."""
    if term.startswith("tel:"):
        return [term, term.removeprefix("tel:")]
    return [term, f"tel:{term}"]


def newest_first_matches(queryset: QuerySet, match: Q) -> QuerySet:
    """Rows matching an OR of exact lookups, without walking the whole date index for a rare value.

    Asked for the newest matches, PostgreSQL walks the started_at index backwards and tests each row; for a
    value with no or few matches (an unknown conversation id) that walk reads the whole table. So the matches
    are first collected unordered (a BitmapOr of the columns' indexes), at most SEARCH_HITS of them; a value
    that matches more than that is common, and the index walk finds its newest rows quickly.
    """
    hits = list(queryset.filter(match).order_by().values_list("pk", flat=True)[: SEARCH_HITS + 1])
    if len(hits) > SEARCH_HITS:
        return queryset.filter(match)
    return queryset.filter(pk__in=hits)


# --- Conversations ------------------------------------------------------------------------------------------

class ParticipantInline(ReadOnlyInline):
    model = Participant
    fields = ("purpose", "name", "user_id", "queue_id", "connected_at", "ended_at", "wrapup_code",
              "acw_seconds")
    readonly_fields = fields
    ordering = ("connected_at", "pk")


class HookDeliveryInline(ReadOnlyInline):
    model = HookDelivery
    fields = ("trigger", "hook", "status", "attempts", "last_error", "created_at", "finished_at",
              "next_attempt_at")
    readonly_fields = fields
    show_change_link = True


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    list_display = ("conversation_id", "state", "media_type", "direction", "queue", "agent", "started_at",
                    "duration", "wrapup")
    list_filter = ("state", "started_at", indexed_values_filter("media_type", title="media"),
                   indexed_values_filter("direction", title="direction"),
                   indexed_values_filter("queue_id", title="queue", label_field="queue_name"))
    list_select_related = ()  # no foreign keys to follow: every column is on the row
    date_hierarchy = "started_at"
    sortable_by = ("started_at",)
    # get_search_results below does the searching; listing the fields shows the search box.
    search_fields = ("conversation_id", "ani", "dnis", "agent_name", "agent_id")
    search_help_text = "Exact value: conversation id, ANI or DNIS (with or without tel:), agent name or id."
    inlines = (ParticipantInline, HookDeliveryInline)  # events: see render_change_form (no foreign key)
    fieldsets = (
        (None, {"fields": ("conversation_id", "state", "media_type", "direction", "ani", "dnis")}),
        ("Queue and agent", {"fields": ("queue_id", "queue_name", "agent_id", "agent_name")}),
        ("Times", {"fields": ("started_at", "ended_at", "wrapped_up_at", "last_event_at", "duration")}),
        ("Wrap-up", {"fields": ("wrapup_code", "wrapup_name", "wrapup_notes")}),
        ("Derivation", {"classes": ("collapse",),
                        "fields": ("created_at", "updated_at", "field_versions_pretty")}),
    )
    readonly_fields = ("duration", "field_versions_pretty")

    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        phones = phone_variants(term)
        match = (Q(conversation_id=term) | Q(ani__in=phones) | Q(dnis__in=phones) | Q(agent_name=term)
                 | Q(agent_id=term))
        return newest_first_matches(queryset, match), False

    @admin.display(description="queue")
    def queue(self, obj: Conversation) -> str:
        return obj.queue_name or obj.queue_id or "—"

    @admin.display(description="agent")
    def agent(self, obj: Conversation) -> str:
        return obj.agent_name or obj.agent_id or "—"

    @admin.display(description="duration")
    def duration(self, obj: Conversation) -> str:
        if obj.started_at is None:
            return "—"
        if obj.ended_at is None:
            return f"{format_duration(datetime.now(UTC) - obj.started_at)} so far"
        return format_duration(obj.ended_at - obj.started_at)

    @admin.display(description="wrap-up")
    def wrapup(self, obj: Conversation) -> str:
        if not obj.wrapup_code:
            return "—"
        if not obj.wrapup_name:
            return obj.wrapup_code
        return format_html('{} <span class="quiet">({})</span>', obj.wrapup_name, obj.wrapup_code)

    @admin.display(description="field versions")
    def field_versions_pretty(self, obj: Conversation) -> str:
        return pretty_json(obj.field_versions)

    def render_change_form(self, request: HttpRequest, context: dict[str, Any], add: bool = False,
                           change: bool = False, form_url: str = "",
                           obj: Conversation | None = None) -> HttpResponse:
        if obj is not None:
            context.update(recent_events_context(obj))
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url,
                                          obj=obj)


def recent_events_context(conversation: Conversation) -> dict[str, Any]:
    """The newest events of a conversation (one indexed query) and a link to all of them."""
    events = list(Event.objects.filter(conversation_id=conversation.conversation_id)
                  .order_by("-occurred_at", "-pk")[: EVENTS_ON_CONVERSATION_PAGE + 1])
    query = urlencode({"q": conversation.conversation_id})
    url = f"{reverse('admin:conversations_event_changelist')}?{query}"
    shown = events[:EVENTS_ON_CONVERSATION_PAGE]
    return {
        "event_rows": [(event, pretty_json_text(event.payload)) for event in shown],
        "events_truncated": len(events) > EVENTS_ON_CONVERSATION_PAGE,
        "events_shown_max": EVENTS_ON_CONVERSATION_PAGE,
        "all_events_url": url,
    }


# --- Events and rejects -------------------------------------------------------------------------------------

@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ("occurred_at", "event_type", "kind", "conversation", "source", "sse_id", "received_at",
                    "lag")
    list_filter = ("kind", indexed_values_filter("source", title="source"),
                   indexed_values_filter("event_type", title="type"))
    date_hierarchy = "occurred_at"
    sortable_by = ("occurred_at", "received_at")
    search_fields = ("conversation_id", "dedupe_key")
    search_help_text = "Exact value: conversation id or dedupe key."
    actions = None  # no bulk delete, no bulk anything: events are facts
    fields = ("event_type", "kind", "conversation", "occurred_at", "received_at", "source", "sse_id",
              "dedupe_key", "raw_payload")
    readonly_fields = ("conversation", "raw_payload")

    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(conversation_id=term) | Q(dedupe_key=term)), False

    @admin.display(description="conversation")
    def conversation(self, obj: Event) -> str:
        return conversation_search_link(obj.conversation_id)

    @admin.display(description="lag")
    def lag(self, obj: Event) -> str:
        return format_duration(obj.received_at - obj.occurred_at)

    @admin.display(description="payload")
    def raw_payload(self, obj: Event) -> str:
        return pretty_json(obj.payload)


@admin.register(RejectedEvent)
class RejectedEventAdmin(ReadOnlyAdmin):
    list_display = ("received_at", "source", "sse_id", "short_error", "short_raw", "reprocessed_at")
    list_filter = (PendingRejectFilter, indexed_values_filter("source", title="source"))
    date_hierarchy = "received_at"
    sortable_by = ("received_at",)
    actions = ("reprocess",)
    fields = ("source", "sse_id", "received_at", "reprocessed_at", "raw_text", "error_text")
    readonly_fields = ("raw_text", "error_text")

    def has_reprocess_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("conversations.change_rejectedevent")

    @admin.display(description="error")
    def short_error(self, obj: RejectedEvent) -> str:
        return shorten(obj.error)

    @admin.display(description="raw text")
    def short_raw(self, obj: RejectedEvent) -> str:
        return shorten(obj.raw, 60)

    @admin.display(description="raw text")
    def raw_text(self, obj: RejectedEvent) -> str:
        return pre(obj.raw)

    @admin.display(description="error")
    def error_text(self, obj: RejectedEvent) -> str:
        return pre(obj.error)

    @admin.action(description="Reprocess the selected rejects through the pipeline",
                  permissions=("reprocess",))
    def reprocess(self, request: HttpRequest, queryset: QuerySet[RejectedEvent]) -> None:
        try:
            result = reprocess_pending(queryset, limit=REPROCESS_PER_ACTION)
        except DatabaseError as exc:  # transient (lock, connection): nothing half-done is lost, try again
            logger.warning("reprocessing rejects failed for %s: %s", request.user, exc)
            self.message_user(request, f"Reprocessing failed, nothing was lost; try again ({exc}).",
                              messages.ERROR)
            return
        logger.info("%s reprocessed rejects: %s", request.user, result)
        self.message_user(request, reprocess_message(result), reprocess_level(result))


def reprocess_message(result: ReprocessResult) -> str:
    if not (result.reprocessed or result.still_failing):
        return "Nothing to reprocess: the selected rejects were all reprocessed before."
    text = (f"{result.reprocessed} reprocessed ({result.new_events} new events, "
            f"{result.duplicates} already stored); {result.still_failing} still failing (error updated).")
    if result.more_pending:
        text += f" Only the oldest {REPROCESS_PER_ACTION} were taken: run the action again for the rest."
    return text


def reprocess_level(result: ReprocessResult) -> int:
    return messages.WARNING if result.still_failing or result.more_pending else messages.SUCCESS


# --- Hook deliveries ----------------------------------------------------------------------------------------

@admin.register(HookDelivery)
class HookDeliveryAdmin(ReadOnlyAdmin):
    list_display = ("id", "conversation_link", "trigger", "hook", "status", "attempts", "short_error",
                    "created_at", "finished_at", "next_attempt_at", "last_duration_ms")
    list_filter = ("status", TriggerFilter)
    list_select_related = ("conversation",)
    date_hierarchy = "created_at"
    sortable_by = ("created_at",)
    search_fields = ("conversation__conversation_id",)
    search_help_text = "Exact conversation id."
    actions = ("rerun",)
    fields = ("conversation_link", "trigger", "hook", "status", "attempts", "idempotency_key", "created_at",
              "enqueued_at", "started_at", "finished_at", "next_attempt_at", "last_duration_ms", "error_text")
    readonly_fields = ("conversation_link", "error_text")

    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        return (queryset.filter(conversation__conversation_id=term) if term else queryset), False

    def has_rerun_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("conversations.change_hookdelivery")

    @admin.display(description="conversation")
    def conversation_link(self, obj: HookDelivery) -> str:
        return admin_link(obj.conversation, obj.conversation.conversation_id)

    @admin.display(description="last error")
    def short_error(self, obj: HookDelivery) -> str:
        return shorten(obj.last_error)

    @admin.display(description="last error")
    def error_text(self, obj: HookDelivery) -> str:
        return pre(obj.last_error) if obj.last_error else "—"

    @admin.action(description="Re-run the selected hook deliveries", permissions=("rerun",))
    def rerun(self, request: HttpRequest, queryset: QuerySet[HookDelivery]) -> None:
        from conversations.outbox import rerun_deliveries  # written by the hooks work; imported when used

        ids = list(queryset.order_by("pk").values_list("pk", flat=True)[: RERUN_PER_ACTION + 1])
        count = rerun_deliveries(HookDelivery.objects.filter(pk__in=ids[:RERUN_PER_ACTION]))
        logger.info("%s re-ran %d hook deliveries", request.user, count)
        text = f"{count} hook deliveries queued to run again."
        if len(ids) > RERUN_PER_ACTION:
            text += f" Only {RERUN_PER_ACTION} were taken: run the action again for the rest."
        self.message_user(request, text, messages.SUCCESS)


# --- Stream health ------------------------------------------------------------------------------------------

def connection_stale_after() -> timedelta:
    """An open connection without a heartbeat for twice the read timeout belongs to a worker that died."""
    return timedelta(seconds=2 * settings.SSE_READ_TIMEOUT)


def connection_health(*, connected_at: datetime | None, disconnected_at: datetime | None,
                      heartbeat_at: datetime | None) -> str:
    if connected_at is None:
        return "never connected"
    if disconnected_at is not None:
        return "closed"
    last_sign = heartbeat_at or connected_at
    return "live" if datetime.now(UTC) - last_sign <= connection_stale_after() else "stale"


@admin.register(StreamCheckpoint)
class StreamCheckpointAdmin(ReadOnlyAdmin):
    """One row per source: where it resumes, and its latest connection and worker, at a glance."""

    list_display = ("source", "stream", "connected_for", "last_disconnect", "connections_24h", "worker_beat",
                    "last_event_id", "events_committed", "updated_at")
    sortable_by = ()

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        latest = StreamConnection.objects.filter(source=OuterRef("source")).order_by("-connected_at")
        closed = latest.filter(disconnected_at__isnull=False)
        day_ago = datetime.now(UTC) - timedelta(days=1)
        recent = (StreamConnection.objects.filter(source=OuterRef("source"), connected_at__gte=day_ago)
                  .order_by().values("source").annotate(n=Count("pk")).values("n"))
        beats = WorkerHeartbeat.objects.filter(source=OuterRef("source")).order_by("-beat_at")
        return super().get_queryset(request).annotate(
            latest_connected_at=Subquery(latest.values("connected_at")[:1]),
            latest_disconnected_at=Subquery(latest.values("disconnected_at")[:1]),
            latest_heartbeat_at=Subquery(latest.values("last_heartbeat_at")[:1]),
            last_closed_at=Subquery(closed.values("disconnected_at")[:1]),
            last_closed_reason=Subquery(closed.values("disconnect_reason")[:1]),
            recent_connections=Coalesce(Subquery(recent), 0),
            worker_beat_at=Subquery(beats.values("beat_at")[:1]),
        )

    @admin.display(description="stream")
    def stream(self, obj: StreamCheckpoint) -> str:
        health = connection_health(connected_at=obj.latest_connected_at,
                                   disconnected_at=obj.latest_disconnected_at,
                                   heartbeat_at=obj.latest_heartbeat_at)
        url = reverse("admin:conversations_streamconnection_changelist") + "?" + urlencode(
            {"source": obj.source})
        return format_html('<a href="{}">{}</a>', url, health)

    @admin.display(description="connected for")
    def connected_for(self, obj: StreamCheckpoint) -> str:
        if obj.latest_connected_at is None or obj.latest_disconnected_at is not None:
            return "—"
        return format_duration(datetime.now(UTC) - obj.latest_connected_at)

    @admin.display(description="last disconnect")
    def last_disconnect(self, obj: StreamCheckpoint) -> str:
        if obj.last_closed_at is None:
            return "—"
        return f"{ago(obj.last_closed_at)}: {shorten(obj.last_closed_reason or 'no reason', 60)}"

    @admin.display(description="connections in 24 h")
    def connections_24h(self, obj: StreamCheckpoint) -> int:
        return obj.recent_connections

    @admin.display(description="worker heartbeat")
    def worker_beat(self, obj: StreamCheckpoint) -> str:
        return ago(obj.worker_beat_at)


@admin.register(StreamConnection)
class StreamConnectionAdmin(ReadOnlyAdmin):
    """Connection history per source; the gap before a connection is where events may have been missed."""

    list_display = ("connected_at", "source", "health", "duration", "gap_before", "disconnected_at",
                    "disconnect_reason", "last_heartbeat_at", "last_event_at", "events_received", "worker")
    list_filter = (indexed_values_filter("source", title="source"), OpenConnectionFilter)
    date_hierarchy = "connected_at"
    sortable_by = ("connected_at",)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # The end of the same source's previous connection: one probe of (source, connected_at) per row shown.
        previous = (StreamConnection.objects
                    .filter(source=OuterRef("source"), connected_at__lt=OuterRef("connected_at"))
                    .order_by("-connected_at")
                    .annotate(end=Coalesce("disconnected_at", "last_heartbeat_at", "connected_at"))
                    .values("end")[:1])
        return super().get_queryset(request).annotate(previous_end=Subquery(previous))

    @admin.display(description="health")
    def health(self, obj: StreamConnection) -> str:
        return connection_health(connected_at=obj.connected_at, disconnected_at=obj.disconnected_at,
                                 heartbeat_at=obj.last_heartbeat_at)

    @admin.display(description="duration")
    def duration(self, obj: StreamConnection) -> str:
        end = obj.disconnected_at or datetime.now(UTC)
        text = format_duration(end - obj.connected_at)
        return text if obj.disconnected_at else f"{text} so far"

    @admin.display(description="gap before")
    def gap_before(self, obj: StreamConnection) -> str:
        if obj.previous_end is None:
            return "first"
        gap = obj.connected_at - obj.previous_end
        return "overlap" if gap < timedelta(0) else format_duration(gap)


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(ConsoleAdmin):
    """Written by the workers; an operator may only clear away the rows of workers that are gone."""

    list_display = ("worker", "source", "alive", "connected", "beat_at", "last_event_at", "events_committed",
                    "reconnects", "started_at", "uptime")
    list_filter = (indexed_values_filter("source", title="source"), "connected")
    sortable_by = ("beat_at",)
    ordering = ("-beat_at",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    @admin.display(description="alive", boolean=True)
    def alive(self, obj: WorkerHeartbeat) -> bool:
        return datetime.now(UTC) - obj.beat_at <= WORKER_STALE_AFTER

    @admin.display(description="uptime")
    def uptime(self, obj: WorkerHeartbeat) -> str:
        return format_duration(obj.beat_at - obj.started_at)


# --- API tokens ---------------------------------------------------------------------------------------------

def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """What is stored and looked up: the key itself is shown once and never kept."""
    return hashlib.sha256(key.encode()).hexdigest()


SHOWN_ONCE_SESSION_KEY = "api_token_shown_once"  # {"token": pk, "key": plain key} until the key page reads it


class ApiTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ("user", "name")

    def clean_user(self) -> User:
        """A token grants what its user's session grants: a user who may not watch would get a useless token."""
        user = self.cleaned_data["user"]
        if not can_watch(user):
            raise forms.ValidationError(
                "The user %(user)s is not active staff, so may not watch conversations; an API token grants "
                "only what its user's own login grants.", code="may_not_watch", params={"user": user})
        return user


@admin.register(ApiToken)
class ApiTokenAdmin(ConsoleAdmin):
    form = ApiTokenForm
    list_display = ("prefix", "name", "user", "created_at", "last_used_at")
    list_select_related = ("user",)
    search_fields = ("=prefix", "=user__username")
    sortable_by = ("created_at", "last_used_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")

    def get_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Sequence[str]:
        if obj is None:
            return ("user", "name")
        return ("user", "name", "prefix", "created_at", "last_used_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> Sequence[str]:
        return self.readonly_fields if obj is None else ("user", *self.readonly_fields)

    def get_urls(self) -> list[URLPattern]:
        # Before the default URLs: their "<object_id>/" would also take "<object_id>/key/".
        key_page = path("<path:object_id>/key/", self.admin_site.admin_view(self.key_view),
                        name="conversations_apitoken_key")
        return [key_page, *super().get_urls()]

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if not change:
            key = new_api_key()
            obj.key_hash, obj.prefix = key_hash(key), key[:8]
            obj.plain_key = key  # for response_add only; never saved, never logged
            logger.info("api token %s issued for user %s by %s", obj.prefix, obj.user, request.user)
        super().save_model(request, obj, form, change)

    def response_add(self, request: HttpRequest, obj: ApiToken, post_url_continue: str | None = None
                     ) -> HttpResponse:
        """POST/redirect/GET: a refresh of the page showing the key must not post the form (a second token).
        The key waits in the session for that one page, which takes it out again."""
        request.session[SHOWN_ONCE_SESSION_KEY] = {"token": obj.pk, "key": obj.plain_key}
        return HttpResponseRedirect(reverse("admin:conversations_apitoken_key", args=[obj.pk]))

    def key_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The token just created, with its key the first time only: a refresh or a later visit shows no key."""
        token = self.get_object(request, unquote(object_id))
        if token is None or not self.has_view_or_change_permission(request, token):
            return HttpResponseRedirect(reverse("admin:conversations_apitoken_changelist"))
        context = {**self.admin_site.each_context(request), "opts": self.opts, "token": token,
                   "key": take_shown_once_key(request, token), "title": "API token created"}
        response = TemplateResponse(request, "admin/conversations/apitoken/key_once.html", context)
        response["Cache-Control"] = "no-store"
        return response


def take_shown_once_key(request: HttpRequest, token: ApiToken) -> str | None:
    """The plain key kept for this token's one display, removed from the session as it is read."""
    kept = request.session.get(SHOWN_ONCE_SESSION_KEY)
    if not kept or kept.get("token") != token.pk:
        return None
    del request.session[SHOWN_ONCE_SESSION_KEY]
    return kept["key"]
