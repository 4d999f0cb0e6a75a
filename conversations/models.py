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
    agent_id = models.CharField(max_length=64, blank=True, default="", db_index=True)  # the latest agent
    agent_name = models.CharField(max_length=200, blank=True, default="")
    ani = models.CharField(max_length=100, blank=True, default="", db_index=True)
    dnis = models.CharField(max_length=100, blank=True, default="", db_index=True)
    wrapup_code = models.CharField(max_length=200, blank=True, default="", db_index=True)
    wrapup_name = models.CharField(max_length=200, blank=True, default="")
    wrapup_notes = models.TextField(blank=True, default="")
    # Indexed together with id (conversation_started_id, migration 0003): the history's newest-first pages.
    started_at = models.DateTimeField(null=True, blank=True)
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
    # Not indexed alone: the unique (conversation, participant_id) below starts with it.
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="participants",
                                     db_index=False)
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
    kind = models.CharField(max_length=16, choices=[(k.value, k.value) for k in EventKind])
    event_type = models.CharField(max_length=200)
    conversation_id = models.CharField(max_length=64)
    occurred_at = models.DateTimeField(db_index=True)
    received_at = models.DateTimeField(db_index=True)
    source = models.CharField(max_length=32)
    payload = models.JSONField()

    class Meta:
        ordering = ["-occurred_at"]
        # Every index costs each insert; these are the ones the admin, the history and pruning read (each
        # filter's index also serves the newest-first order). See migration 0007_event_indexes.
        indexes = [
            models.Index(fields=["conversation_id", "occurred_at"], name="event_conversation_time"),
            models.Index(fields=["kind", "occurred_at"], name="event_kind_time"),
            models.Index(fields=["source", "occurred_at"], name="event_source_time"),
            models.Index(fields=["event_type", "occurred_at"], name="event_type_time"),
        ]

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


class HookDelivery(models.Model):
    """The transactional outbox of post-call work: one row per (conversation, trigger, hook), written in the
    batch transaction that moved the conversation, delivered by Celery after commit."""

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="hook_deliveries")
    trigger = models.CharField(max_length=16)  # "end" or "wrapup"
    hook = models.CharField(max_length=200)  # dotted path of the callable
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    idempotency_key = models.CharField(max_length=64, unique=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_duration_ms = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "trigger", "hook"], name="hook_delivery_once")
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="hook_delivery_due")]

    def __str__(self) -> str:
        return f"{self.hook} on {self.trigger} ({self.status})"


class StreamConnection(models.Model):
    """Connection history: one row per connection (SSE stream or Notifications socket). Gaps between a row's
    disconnect and the next row's connect are where events may have been missed."""

    source = models.CharField(max_length=32, db_index=True)
    worker = models.CharField(max_length=200, blank=True, default="")  # host:pid
    channel_id = models.CharField(max_length=200, blank=True, default="")
    connection_id = models.CharField(max_length=64, blank=True, default="")
    connected_at = models.DateTimeField(db_index=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    events_received = models.BigIntegerField(default=0)
    disconnected_at = models.DateTimeField(null=True, blank=True)
    disconnect_reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-connected_at"]
        indexes = [models.Index(fields=["source", "connected_at"], name="stream_connection_source_time")]

    def __str__(self) -> str:
        return f"{self.source} {self.channel_id or self.connection_id} @ {self.connected_at:%Y-%m-%d %H:%M:%S}"


class WorkerHeartbeat(models.Model):
    """Written by a running stream_events worker every few seconds; read by /readyz and stream_status."""

    worker = models.CharField(max_length=200, unique=True)  # host:pid
    source = models.CharField(max_length=32, db_index=True)
    started_at = models.DateTimeField()
    beat_at = models.DateTimeField(db_index=True)
    last_event_at = models.DateTimeField(null=True, blank=True)  # last event or heartbeat from Genesys
    connected = models.BooleanField(default=False)
    events_committed = models.BigIntegerField(default=0)
    reconnects = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.worker} ({self.source}) @ {self.beat_at:%Y-%m-%d %H:%M:%S}"


class ApiToken(models.Model):
    """A per-user token for the read-only JSON API; only its hash is stored."""

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True, default="")
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=8)  # shown in the admin to tell tokens apart
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"


class StreamLease(models.Model):
    """Who may consume a source right now. One row per source; the holder renews it, and every batch it commits
    checks it in the same transaction (a fence), so two workers never both write a source's stream."""

    source = models.CharField(max_length=64, unique=True)
    holder = models.CharField(max_length=200)  # host:pid:random
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.source} held by {self.holder} until {self.expires_at:%H:%M:%S}"
