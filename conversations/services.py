"""Writes: one transaction per batch for raw events, derived conversation state and the checkpoint."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.db import transaction
from django.db.models import F

from conversations import signals
from conversations.derive import (
    CONVERSATION_ATTRS,
    PARTICIPANT_ATTRS,
    ConversationRecord,
    ParticipantRecord,
    apply_event,
    apply_participant,
    version_of,
)
from conversations.events import EventKind, Reject, TypedEvent
from conversations.models import Conversation, Event, Participant, RejectedEvent, StreamCheckpoint

logger = logging.getLogger(__name__)

CONVERSATION_TIMES = ("state", "started_at", "ended_at", "wrapped_up_at", "last_event_at")
SIGNAL_OF_KIND = {
    EventKind.START: signals.conversation_started,
    EventKind.UPDATE: signals.conversation_updated,
    EventKind.END: signals.conversation_ended,
    EventKind.WRAPUP: signals.conversation_wrapped_up,
    EventKind.UNKNOWN: signals.unknown_event,
}


@dataclass
class Transition:
    conversation_id: str
    old_state: str
    new_state: str


@dataclass
class BatchResult:
    new_events: list[TypedEvent] = field(default_factory=list)
    duplicates: int = 0
    rejects: list[RejectedEvent] = field(default_factory=list)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.new_events) + self.duplicates + len(self.rejects)


def ingest_batch(
    *, events: Sequence[TypedEvent], rejects: Sequence[Reject] = (), source: str, last_event_id: str | None = None
) -> BatchResult:
    """Store a batch in one transaction, then tell the rest of the product what changed."""
    with transaction.atomic():
        result = write_batch(events=events, rejects=rejects, source=source, last_event_id=last_event_id)
    send_signals(result)
    return result


def write_batch(
    *, events: Sequence[TypedEvent], rejects: Sequence[Reject], source: str, last_event_id: str | None
) -> BatchResult:
    received_at = datetime.now(UTC)
    new_events = insert_new_events(events, received_at=received_at)
    result = BatchResult(new_events=new_events, duplicates=len(events) - len(new_events))
    result.rejects = store_rejects(rejects, received_at=received_at)
    result.conversations, result.transitions = apply_to_conversations(new_events)
    save_checkpoint(source=source, last_event_id=last_event_id, committed=len(events) + len(rejects))
    return result


def insert_new_events(events: Sequence[TypedEvent], *, received_at: datetime) -> list[TypedEvent]:
    """Insert the events not stored yet; a duplicate (same dedupe key) is counted and skipped."""
    unique: dict[str, TypedEvent] = {}
    for event in events:
        unique.setdefault(event.dedupe_key, event)
    stored = set(Event.objects.filter(dedupe_key__in=list(unique)).values_list("dedupe_key", flat=True))
    new = [event for key, event in unique.items() if key not in stored]
    Event.objects.bulk_create([event_row(e, received_at) for e in new], ignore_conflicts=True)
    return new


def event_row(event: TypedEvent, received_at: datetime) -> Event:
    return Event(
        dedupe_key=event.dedupe_key,
        sse_id=event.sse_id or "",
        kind=event.kind.value,
        event_type=event.event_type,
        conversation_id=event.conversation_id,
        occurred_at=event.occurred_at,
        received_at=received_at,
        source=event.source,
        payload=event.payload,
    )


def store_rejects(rejects: Sequence[Reject], *, received_at: datetime) -> list[RejectedEvent]:
    rows = [
        RejectedEvent(source=r.source, raw=r.raw, error=r.error, sse_id=r.sse_id or "", received_at=received_at)
        for r in rejects
    ]
    RejectedEvent.objects.bulk_create(rows)
    for reject in rejects:
        logger.warning("rejected input from %s (id %s): %s", reject.source, reject.sse_id, reject.error)
    return rows


def apply_to_conversations(
    events: Sequence[TypedEvent],
) -> tuple[dict[str, Conversation], list[Transition]]:
    """One read and one upsert for every conversation the batch touches."""
    moving = [e for e in events if e.kind is not EventKind.UNKNOWN and e.conversation_id]
    ids = sorted({e.conversation_id for e in moving})
    if not ids:
        return {}, []
    existing = Conversation.objects.in_bulk(ids, field_name="conversation_id")
    records = {cid: record_from_row(existing.get(cid), cid) for cid in ids}
    before = {cid: record.state for cid, record in records.items()}
    for event in moving:
        apply_event(records[event.conversation_id], event)
    rows = upsert_conversations(records, existing)
    upsert_participants(rows, moving)
    transitions = [
        Transition(cid, before[cid], record.state) for cid, record in records.items() if before[cid] != record.state
    ]
    return rows, transitions


def record_from_row(row: Conversation | None, conversation_id: str) -> ConversationRecord:
    if row is None:
        return ConversationRecord(conversation_id=conversation_id)
    return ConversationRecord(
        conversation_id=conversation_id,
        state=row.state,
        started_at=row.started_at,
        ended_at=row.ended_at,
        wrapped_up_at=row.wrapped_up_at,
        last_event_at=row.last_event_at,
        attrs={name: getattr(row, name) for name in CONVERSATION_ATTRS if getattr(row, name)},
        versions=dict(row.field_versions),
    )


def upsert_conversations(
    records: dict[str, ConversationRecord], existing: dict[str, Conversation]
) -> dict[str, Conversation]:
    rows = {}
    for cid, record in records.items():
        row = existing.get(cid) or Conversation(conversation_id=cid)
        for name in CONVERSATION_TIMES:
            setattr(row, name, getattr(record, name))
        for name in CONVERSATION_ATTRS:
            setattr(row, name, record.attrs.get(name, ""))
        row.field_versions = record.versions
        rows[cid] = row
    Conversation.objects.bulk_create(
        list(rows.values()),
        update_conflicts=True,
        unique_fields=["conversation_id"],
        update_fields=[*CONVERSATION_TIMES, *CONVERSATION_ATTRS, "field_versions", "updated_at"],
    )
    _fill_missing_pks(rows)
    return rows


def _fill_missing_pks(rows: dict[str, Conversation]) -> None:
    """Backends that cannot return ids from an upsert get them with one extra query."""
    missing = [cid for cid, row in rows.items() if row.pk is None]
    if missing:
        ids = dict(Conversation.objects.filter(conversation_id__in=missing).values_list("conversation_id", "id"))
        for cid in missing:
            rows[cid].pk = ids[cid]


def upsert_participants(conversations: dict[str, Conversation], events: Sequence[TypedEvent]) -> None:
    carrying = [e for e in events if e.participants]
    if not carrying:
        return
    pks = [conversations[e.conversation_id].pk for e in carrying]
    existing = {
        (p.conversation_id, p.participant_id): p for p in Participant.objects.filter(conversation_id__in=set(pks))
    }
    records: dict[tuple[int, str], ParticipantRecord] = {}
    for event in carrying:
        version = version_of(event)
        pk = conversations[event.conversation_id].pk
        for facts in event.participants:
            key = (pk, facts.participant_id)
            if key not in records:
                records[key] = participant_record(existing.get(key), facts.participant_id)
            apply_participant(records[key], facts, version)
    Participant.objects.bulk_create(
        [participant_row(pk, record) for (pk, _), record in records.items()],
        update_conflicts=True,
        unique_fields=["conversation", "participant_id"],
        update_fields=[*PARTICIPANT_ATTRS, "field_versions"],
    )


def participant_record(row: Participant | None, participant_id: str) -> ParticipantRecord:
    if row is None:
        return ParticipantRecord(participant_id=participant_id)
    attrs = {name: getattr(row, name) for name in PARTICIPANT_ATTRS if getattr(row, name) not in (None, "")}
    return ParticipantRecord(participant_id=participant_id, attrs=attrs, versions=dict(row.field_versions))


def participant_row(conversation_pk: int, record: ParticipantRecord) -> Participant:
    row = Participant(conversation_id=conversation_pk, participant_id=record.participant_id)
    for name in PARTICIPANT_ATTRS:
        default = None if name in ("connected_at", "ended_at", "acw_seconds") else ""
        setattr(row, name, record.attrs.get(name, default))
    row.field_versions = record.versions
    return row


def save_checkpoint(*, source: str, last_event_id: str | None, committed: int) -> None:
    """Written in the batch's own transaction: a restart resumes exactly after what was committed."""
    updates: dict[str, object] = {"events_committed": F("events_committed") + committed}
    if last_event_id:
        updates["last_event_id"] = last_event_id
    if not StreamCheckpoint.objects.filter(source=source).update(**updates):
        StreamCheckpoint.objects.create(source=source, last_event_id=last_event_id or "", events_committed=committed)


def load_checkpoint(*, source: str) -> str | None:
    last = StreamCheckpoint.objects.filter(source=source).values_list("last_event_id", flat=True).first()
    return last or None


def send_signals(result: BatchResult) -> None:
    for event in result.new_events:
        conversation = result.conversations.get(event.conversation_id)
        SIGNAL_OF_KIND[event.kind].send(sender=Conversation, event=event, conversation=conversation)
    for reject in result.rejects:
        signals.stream_error.send(sender=RejectedEvent, reject=reject)
