"""Writes: one transaction per batch for raw events, derived conversation state and the checkpoint."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from django.db import connection, transaction
from django.db.models import F

from conversations import bulk, outbox, signals
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
from conversations.models import Conversation, Event, HookDelivery, Participant, RejectedEvent, StreamCheckpoint

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
    deliveries: list[HookDelivery] = field(default_factory=list)  # hook deliveries this batch created

    @property
    def size(self) -> int:
        return len(self.new_events) + self.duplicates + len(self.rejects)


def ingest_batch(
    *, events: Sequence[TypedEvent], rejects: Sequence[Reject] = (), source: str, last_event_id: str | None = None,
    guard: Callable[[], None] | None = None,
) -> BatchResult:
    """Store a batch in one transaction, then tell the rest of the product what changed. `guard` runs first
    inside the transaction (the worker's lease fence): if it raises, nothing of the batch is written."""
    with transaction.atomic():
        if guard is not None:
            guard()
        result = write_batch(events=events, rejects=rejects, source=source, last_event_id=last_event_id)
    send_signals(result)
    outbox.enqueue_after_commit(result.deliveries)
    return result


def write_batch(
    *, events: Sequence[TypedEvent], rejects: Sequence[Reject], source: str, last_event_id: str | None
) -> BatchResult:
    received_at = datetime.now(UTC)
    new_events = insert_new_events(events, received_at=received_at)
    result = BatchResult(new_events=new_events, duplicates=len(events) - len(new_events))
    result.rejects = store_rejects(rejects, received_at=received_at)
    result.conversations, result.transitions = apply_to_conversations(new_events)
    result.deliveries = outbox.create_deliveries(
        conversations=result.conversations, transitions=result.transitions
    )
    save_checkpoint(source=source, last_event_id=last_event_id, committed=len(events) + len(rejects))
    return result


EVENT_COLUMNS = (
    "dedupe_key", "sse_id", "kind", "event_type", "conversation_id", "occurred_at", "received_at", "source", "payload",
)


def insert_new_events(events: Sequence[TypedEvent], *, received_at: datetime) -> list[TypedEvent]:
    """Insert the events not stored yet; the database says which were new (a duplicate is skipped)."""
    unique: dict[str, TypedEvent] = {}
    for event in events:
        unique.setdefault(event.dedupe_key, event)
    inserted = bulk.insert_ignore(
        table=Event._meta.db_table, columns=EVENT_COLUMNS, rows=[event_values(e, received_at) for e in unique.values()],
        conflict=["dedupe_key"], returning=["dedupe_key"],
    )
    new_keys = {key for (key,) in inserted}
    return [event for key, event in unique.items() if key in new_keys]


def event_values(event: TypedEvent, received_at: datetime) -> tuple:
    return (
        event.dedupe_key, event.sse_id or "", event.kind.value, event.event_type, event.conversation_id,
        event.occurred_at, received_at, event.source, orjson.dumps(event.payload).decode(),
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


CONVERSATION_FIELDS = (*CONVERSATION_TIMES, *CONVERSATION_ATTRS, "field_versions")
PARTICIPANT_FIELDS = (*PARTICIPANT_ATTRS, "field_versions")
PARTICIPANT_NULLABLE = {"connected_at", "ended_at", "acw_seconds"}
# A written conversation becomes a model instance without a read: its columns in the order Model.from_db expects.
CONVERSATION_COLUMNS = tuple(f.attname for f in Conversation._meta.concrete_fields)


def apply_to_conversations(
    events: Sequence[TypedEvent],
) -> tuple[dict[str, Conversation], list[Transition]]:
    """One read and one upsert for every conversation the batch touches (and the same for participants)."""
    moving = [e for e in events if e.kind is not EventKind.UNKNOWN and e.conversation_id]
    ids = sorted({e.conversation_id for e in moving})
    if not ids:
        return {}, []
    claim_conversations(ids)
    existing = {
        row["conversation_id"]: row
        for row in bulk.select_in(model=Conversation, columns=("id", "conversation_id", "created_at",
                                                               *CONVERSATION_FIELDS),
                                  key="conversation_id", keys=ids, lock=True)
    }
    records = {cid: record_from_row(existing.get(cid), cid) for cid in ids}
    before = {cid: record.state for cid, record in records.items()}
    versions = [version_of(event) for event in moving]  # once per event, for its conversation and participants
    for event, version in zip(moving, versions):
        apply_event(records[event.conversation_id], event, version=version)
    rows = upsert_conversations(records, existing)
    upsert_participants(rows, moving, versions)
    transitions = [
        Transition(cid, before[cid], record.state) for cid, record in records.items() if before[cid] != record.state
    ]
    return rows, transitions


def claim_conversations(ids: Sequence[str]) -> None:
    """Make sure every conversation has a row, then the read above locks them all: a second writer (a backfill
    run by hand, a reprocess from the admin) folding the same conversation waits for this batch and then folds
    on top of its result, instead of overwriting it. (On SQLite one writer holds the database anyway.)"""
    if connection.vendor != "postgresql":
        return
    now = datetime.now(UTC)
    bulk.insert_ignore(
        table=Conversation._meta.db_table,
        columns=["conversation_id", "state", *CONVERSATION_ATTRS, "field_versions", "created_at", "updated_at"],
        rows=[(cid, "", *([""] * len(CONVERSATION_ATTRS)), "{}", now, now) for cid in ids],
        conflict=["conversation_id"], returning=["conversation_id"],
    )


def record_from_row(row: dict | None, conversation_id: str) -> ConversationRecord:
    if row is None:
        return ConversationRecord(conversation_id=conversation_id)
    return ConversationRecord(
        conversation_id=conversation_id,
        state=row["state"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        wrapped_up_at=row["wrapped_up_at"],
        last_event_at=row["last_event_at"],
        attrs={name: row[name] for name in CONVERSATION_ATTRS if row[name]},
        versions=dict(row["field_versions"]),
    )


def conversation_fields(record: ConversationRecord) -> dict:
    fields = {name: getattr(record, name) for name in CONVERSATION_TIMES}
    fields.update({name: record.attrs.get(name, "") for name in CONVERSATION_ATTRS})
    fields["field_versions"] = record.versions
    return fields


def upsert_conversations(records: dict[str, ConversationRecord], existing: dict[str, dict]) -> dict[str, Conversation]:
    """Write the folded state; return the rows as model instances (for signals and the hook outbox)."""
    now = datetime.now(UTC)
    fields = {cid: conversation_fields(record) for cid, record in records.items()}
    written = bulk.upsert(
        table=Conversation._meta.db_table,
        columns=["conversation_id", *CONVERSATION_FIELDS, "created_at", "updated_at"],
        rows=[(cid, *db_values(f), now, now) for cid, f in fields.items()],
        conflict=["conversation_id"], update=[*CONVERSATION_FIELDS, "updated_at"], returning=["conversation_id", "id"],
    )
    rows: dict[str, Conversation] = {}
    for cid, pk in written:
        values = fields[cid]
        values.update(id=pk, conversation_id=cid, created_at=existing[cid]["created_at"] if cid in existing else now,
                      updated_at=now)
        rows[cid] = Conversation.from_db(connection.alias, CONVERSATION_COLUMNS,
                                         [values[name] for name in CONVERSATION_COLUMNS])
    return rows


def db_values(fields: dict) -> list:
    """CONVERSATION_FIELDS in order, the versions as JSON text."""
    values = [fields[name] for name in CONVERSATION_FIELDS]
    values[-1] = orjson.dumps(values[-1]).decode()
    return values


def upsert_participants(
    conversations: dict[str, Conversation], events: Sequence[TypedEvent], versions: Sequence[str]
) -> None:
    carrying = [(event, version) for event, version in zip(events, versions) if event.participants]
    if not carrying:
        return
    pks = sorted({conversations[event.conversation_id].pk for event, _ in carrying})
    existing = {
        (row["conversation_id"], row["participant_id"]): row
        for row in bulk.select_in(model=Participant, columns=("conversation_id", "participant_id",
                                                              *PARTICIPANT_FIELDS),
                                  key="conversation_id", keys=pks)
    }
    records: dict[tuple[int, str], ParticipantRecord] = {}
    for event, version in carrying:
        pk = conversations[event.conversation_id].pk
        for facts in event.participants:
            key = (pk, facts.participant_id)
            record = records.get(key)
            if record is None:
                record = records[key] = participant_record(existing.get(key), facts.participant_id)
            apply_participant(record, facts, version)
    bulk.upsert(
        table=Participant._meta.db_table,
        columns=["conversation_id", "participant_id", *PARTICIPANT_FIELDS],
        rows=[(pk, pid, *participant_values(record)) for (pk, pid), record in sorted(records.items())],
        conflict=["conversation_id", "participant_id"], update=PARTICIPANT_FIELDS, returning=["id"],
    )


def participant_record(row: dict | None, participant_id: str) -> ParticipantRecord:
    if row is None:
        return ParticipantRecord(participant_id=participant_id)
    attrs = {name: row[name] for name in PARTICIPANT_ATTRS if row[name] not in (None, "")}
    return ParticipantRecord(participant_id=participant_id, attrs=attrs, versions=dict(row["field_versions"]))


def participant_values(record: ParticipantRecord) -> tuple:
    values = [record.attrs.get(name, None if name in PARTICIPANT_NULLABLE else "") for name in PARTICIPANT_ATTRS]
    return (*values, orjson.dumps(record.versions).decode())


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
