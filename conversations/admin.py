"""The operators' console: conversations, raw events, rejects and checkpoints."""
from __future__ import annotations

import json

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from conversations.models import Conversation, Event, Participant, RejectedEvent, StreamCheckpoint


def pretty_json(value: object) -> str:
    return format_html("<pre style='white-space: pre-wrap'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))


class ReadOnlyAdmin(admin.ModelAdmin):
    """Stored events are facts: never added, edited or deleted from the admin."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class ParticipantInline(admin.TabularInline):
    model = Participant
    extra = 0
    can_delete = False
    fields = ("purpose", "name", "user_id", "queue_id", "connected_at", "ended_at", "wrapup_code", "acw_seconds")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdmin):
    list_display = ("conversation_id", "state", "media_type", "direction", "queue_name", "started_at", "ended_at",
                    "wrapup_name", "last_event_at")
    list_filter = ("state", "media_type", "direction")
    search_fields = ("=conversation_id", "=ani", "=dnis")
    date_hierarchy = "started_at"
    show_full_result_count = False
    inlines = [ParticipantInline]
    exclude = ("field_versions",)


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ("occurred_at", "event_type", "kind", "conversation_id", "source", "sse_id", "received_at")
    list_filter = ("kind", "source", "event_type")
    search_fields = ("=conversation_id", "=sse_id")
    show_full_result_count = False
    exclude = ("payload",)
    readonly_fields = ("raw_payload",)

    @admin.display(description="payload")
    def raw_payload(self, obj: Event) -> str:
        return pretty_json(obj.payload)


@admin.register(RejectedEvent)
class RejectedEventAdmin(ReadOnlyAdmin):
    list_display = ("received_at", "source", "sse_id", "error", "reprocessed_at")
    list_filter = ("source",)
    show_full_result_count = False


@admin.register(StreamCheckpoint)
class StreamCheckpointAdmin(ReadOnlyAdmin):
    list_display = ("source", "last_event_id", "events_committed", "updated_at")
