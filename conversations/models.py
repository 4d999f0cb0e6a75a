"""The event store: raw events, the derived state of each conversation, rejects and resume checkpoints."""
from __future__ import annotations

from django.db import models

from conversations.events import ConversationState, EventKind


class Conversation(models.Model):
    """One row per Genesys conversation; every field is derived from its events, in any order."""

    conversation_id = models.CharField(max_length=64, unique=True)
    state = models.CharField(max_length=16, choices=[(s.value, s.value) for s in ConversationState], db_index=True)
    media_type = models.CharField(max_length=32, blank=True, default="", db_index=True)
    direction = models.CharField(max_length=16, blank=True, default="", db_index=True)
    queue_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    queue_name = models.CharField(max_length=200, blank=True, default="")
    ani = models.CharField(max_length=100, blank=True, default="", db_index=True)
    dnis = models.CharField(max_length=100, blank=True, default="", db_index=True)
    wrapup_code = models.CharField(max_length=200, blank=True, default="", db_index=True)
    wrapup_name = models.CharField(max_length=200, blank=True, default="")
    wrapup_notes = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    wrapped_up_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # For each attribute, the version (occurred-at|dedupe-key) of the event its value came from, so the newest
    # statement wins whatever order events arrive in.
    field_versions = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.conversation_id} ({self.state})"


class Participant(models.Model):
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="participants")
    participant_id = models.CharField(max_length=64)
    purpose = models.CharField(max_length=32, blank=True, default="")
    user_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    name = models.CharField(max_length=200, blank=True, default="")
    queue_id = models.CharField(max_length=64, blank=True, default="")
    connected_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    wrapup_code = models.CharField(max_length=200, blank=True, default="")
    wrapup_notes = models.TextField(blank=True, default="")
    acw_seconds = models.IntegerField(null=True, blank=True)
    field_versions = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "participant_id"], name="participant_unique_per_conversation")
        ]

    def __str__(self) -> str:
        return f"{self.purpose or 'participant'} {self.name or self.participant_id}"


class Event(models.Model):
    """Every accepted event, raw payload included. Never edited after it is written."""

    dedupe_key = models.CharField(max_length=64, unique=True)
    sse_id = models.CharField(max_length=200, blank=True, default="")
    kind = models.CharField(max_length=16, choices=[(k.value, k.value) for k in EventKind], db_index=True)
    event_type = models.CharField(max_length=200, db_index=True)
    conversation_id = models.CharField(max_length=64, db_index=True)
    occurred_at = models.DateTimeField(db_index=True)
    received_at = models.DateTimeField(db_index=True)
    source = models.CharField(max_length=32, db_index=True)
    payload = models.JSONField()

    class Meta:
        ordering = ["-occurred_at"]
        indexes = [models.Index(fields=["conversation_id", "occurred_at"], name="event_conversation_time")]

    def __str__(self) -> str:
        return f"{self.event_type} {self.conversation_id} @ {self.occurred_at:%Y-%m-%d %H:%M:%S}"


class RejectedEvent(models.Model):
    """Input that could not be parsed, kept aside with its raw text so nothing is lost."""

    source = models.CharField(max_length=32, db_index=True)
    raw = models.TextField()
    error = models.TextField()
    sse_id = models.CharField(max_length=200, blank=True, default="")
    received_at = models.DateTimeField(db_index=True)
    reprocessed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"reject from {self.source} @ {self.received_at:%Y-%m-%d %H:%M:%S}: {self.error[:60]}"


class StreamCheckpoint(models.Model):
    """Per source, the last event id committed; written in the batch's own transaction."""

    source = models.CharField(max_length=64, unique=True)
    last_event_id = models.CharField(max_length=200, blank=True, default="")
    events_committed = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.source}: {self.last_event_id or '(start)'}"
