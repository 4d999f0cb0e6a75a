"""Writes: one transaction per batch for raw events, derived conversation state and the checkpoint."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from conversations.models import (
    Conversation,
    Event,
    HookDelivery,
    Participant,
    RejectedEvent,
    StreamCheckpoint,
)

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
    conversations: Mapping[str, Conversation] = field(default_factory=dict)
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
    after_commit(result)
    return result


def after_commit(result: BatchResult) -> None:
    send_signals(result)
    outbox.enqueue_after_commit(result.deliveries)


def write_batch(
    *, events: Sequence[TypedEvent], rejects: Sequence[Reject], source: str, last_event_id: str | None
) -> BatchResult:
    """Fold the batch on the stored state and store it, under the writer lock (in the caller's transaction)."""
    hold_writer_lock()
    return store(fold_batch(events=events, rejects=rejects, source=source, last_event_id=last_event_id,
                            load=read_state))


# The PostgreSQL advisory lock every batch holds until it commits (an arbitrary key of our own: "convfold"), and
# the sequence each holder draws from: a gap in the numbers one writer draws means another writer wrote between.
WRITER_LOCK = 0x636F6E76666F6C64
WRITER_SEQUENCE = "conversations_writer_generation"


def hold_writer_lock() -> int | None:
    """One batch writes at a time, whoever writes it (the worker, a backfill run by hand, a reprocess from the
    admin): each folds on what the previous batch committed, and an event is known new by a read, not a
    unique-index clash. Held until the transaction ends. Returns this batch's generation number (PostgreSQL;
    SQLite has one writer at a time anyway and returns None)."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [WRITER_LOCK])
        # Drawn only once the lock is held (a separate statement: the order of one SELECT's expressions is not
        # promised), so the numbers follow the order in which writers hold the lock.
        cursor.execute(f"SELECT nextval('{WRITER_SEQUENCE}')")
        return cursor.fetchone()[0]


# -- folding: events -> the rows of the conversations and participants they change ---------------------------


@dataclass
class FoldState:
    """A conversation as the fold sees it: its record, its participants, and the rows last written of both
    (a row that comes out of a fold unchanged is not written again)."""

    record: ConversationRecord
    pk: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    row: tuple | None = None
    participants: dict[str, ParticipantRecord] = field(default_factory=dict)
    participant_rows: dict[str, tuple] = field(default_factory=dict)


Loader = Callable[[Sequence[str]], dict[str, FoldState]]
Stored = tuple[int, datetime, datetime]  # a conversation row's pk, created_at and updated_at


class FoldCache:
    """A Loader for a writer that folds a batch before the previous one is committed (pipeline.FoldAhead): it
    serves the conversations of batches folded but not committed as folded, and reads every other one, whose
    stored state is then current. Exactly those conversations are kept (pinned by each batch that loaded
    them until it is stored), so its size is bounded by the batches in flight."""

    def __init__(self) -> None:
        self.states: dict[str, FoldState] = {}
        self.pins: dict[str, int] = {}
        self.lock = threading.Lock()
        self.epoch = 0

    def load(self, ids: Sequence[str]) -> dict[str, FoldState]:
        with self.lock:
            found = {cid: self.states[cid] for cid in ids if cid in self.states}
        read = read_state([cid for cid in ids if cid not in found])  # nothing is pinned if this fails
        found.update(read)
        with self.lock:
            for cid in ids:
                # (Re)kept even if released meanwhile: its batch committed, so this state is the stored one.
                self.states[cid] = found[cid]
                self.pins[cid] = self.pins.get(cid, 0) + 1
        return {cid: found[cid] for cid in ids}

    def release(self, ids: Iterable[str]) -> None:
        """A batch that loaded these is stored (or given up): what no other batch in flight holds goes."""
        with self.lock:
            for cid in ids:
                pins = self.pins.get(cid, 0) - 1
                if pins > 0:
                    self.pins[cid] = pins
                else:
                    self.pins.pop(cid, None)
                    self.states.pop(cid, None)

    def clear(self, *, epoch: int) -> None:
        with self.lock:
            self.states.clear()
            self.pins.clear()
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.states)


@dataclass
class FoldedBatch:
    """A batch folded and ready to store: only immutable rows, so the next batch can be folded meanwhile."""

    events: list[TypedEvent]  # unique by dedupe key
    rejects: Sequence[Reject]
    source: str
    last_event_id: str | None
    committed: int  # what the checkpoint counts: every event and reject read, duplicates included
    rows: dict[str, tuple]  # conversation id -> CONVERSATION_FIELDS values, for every conversation touched
    changed: list[str]  # the conversations whose row changed (written)
    known: dict[str, Stored]  # conversation id -> (pk, created_at, updated_at) of rows that exist already
    participants: list[tuple]  # (conversation id, participant id, *PARTICIPANT_FIELDS values) that changed
    transitions: list[Transition]


def fold_batch(
    *, events: Sequence[TypedEvent], rejects: Sequence[Reject], source: str, last_event_id: str | None, load: Loader,
) -> FoldedBatch:
    """Fold every event of the batch into the state `load` gives. Duplicates need no special care: the fold is
    idempotent, so an event already folded changes nothing and its conversation is not written again."""
    unique: dict[str, TypedEvent] = {}
    for event in events:
        unique.setdefault(event.dedupe_key, event)
    moving = [e for e in unique.values() if e.kind is not EventKind.UNKNOWN and e.conversation_id]
    states = load(sorted({e.conversation_id for e in moving})) if moving else {}
    before = {cid: state.record.state for cid, state in states.items()}
    for event in moving:
        version = version_of(event)
        state = states[event.conversation_id]
        apply_event(state.record, event, version=version)
        for facts in event.participants:
            record = state.participants.get(facts.participant_id)
            if record is None:
                record = state.participants[facts.participant_id] = ParticipantRecord(facts.participant_id)
            apply_participant(record, facts, version)
    rows: dict[str, tuple] = {}
    changed: list[str] = []
    participants: list[tuple] = []
    known: dict[str, Stored] = {}
    for cid, state in states.items():
        row = rows[cid] = conversation_row(state.record)
        if row != state.row:
            state.row = row
            changed.append(cid)
        if state.pk is not None:
            known[cid] = (state.pk, state.created_at, state.updated_at)
        for pid, record in state.participants.items():
            values = participant_values(record)
            if values != state.participant_rows.get(pid):
                state.participant_rows[pid] = values
                participants.append((cid, pid, *values))
    transitions = [Transition(cid, before[cid], state.record.state) for cid, state in states.items()
                   if before[cid] != state.record.state]
    return FoldedBatch(
        events=list(unique.values()), rejects=rejects, source=source, last_event_id=last_event_id,
        committed=len(events) + len(rejects), rows=rows, changed=changed, known=known, participants=participants,
        transitions=transitions,
    )


def read_state(ids: Sequence[str]) -> dict[str, FoldState]:
    """The stored state of these conversations (a new one starts empty): two reads, whatever the count."""
    found = {
        row["conversation_id"]: row
        for row in bulk.select_in(model=Conversation, columns=("id", "conversation_id", "created_at", "updated_at",
                                                               *CONVERSATION_FIELDS),
                                  key="conversation_id", keys=ids)
    }
    states = {cid: state_from_row(found.get(cid), cid) for cid in ids}
    by_pk = {state.pk: state for state in states.values() if state.pk is not None}
    for row in bulk.select_in(model=Participant, columns=("conversation_id", "participant_id", *PARTICIPANT_FIELDS),
                              key="conversation_id", keys=sorted(by_pk)):
        state, pid = by_pk[row["conversation_id"]], row["participant_id"]
        record = state.participants[pid] = participant_record(row, pid)
        state.participant_rows[pid] = participant_values(record)
    return states


def state_from_row(row: dict | None, conversation_id: str) -> FoldState:
    if row is None:
        return FoldState(record=ConversationRecord(conversation_id=conversation_id))
    record = ConversationRecord(
        conversation_id=conversation_id,
        state=row["state"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        wrapped_up_at=row["wrapped_up_at"],
        last_event_at=row["last_event_at"],
        attrs={name: row[name] for name in CONVERSATION_ATTRS if row[name]},
        versions=dict(row["field_versions"]),
    )
    return FoldState(record=record, pk=row["id"], created_at=row["created_at"], updated_at=row["updated_at"],
                     row=conversation_row(record))


def conversation_row(record: ConversationRecord) -> tuple:
    """CONVERSATION_FIELDS in order, the versions as JSON text (sorted keys: equal state, equal row)."""
    attrs = record.attrs
    return (
        record.state, record.started_at, record.ended_at, record.wrapped_up_at, record.last_event_at,
        *[attrs.get(name, "") for name in CONVERSATION_ATTRS],
        orjson.dumps(record.versions, option=orjson.OPT_SORT_KEYS).decode(),
    )


def participant_record(row: dict, participant_id: str) -> ParticipantRecord:
    attrs = {name: row[name] for name in PARTICIPANT_ATTRS if row[name] not in (None, "")}
    return ParticipantRecord(participant_id=participant_id, attrs=attrs, versions=dict(row["field_versions"]))


def participant_values(record: ParticipantRecord) -> tuple:
    attrs = record.attrs
    values = [attrs.get(name, None if name in PARTICIPANT_NULLABLE else "") for name in PARTICIPANT_ATTRS]
    return (*values, orjson.dumps(record.versions, option=orjson.OPT_SORT_KEYS).decode())


# -- storing a folded batch ----------------------------------------------------------------------------------


def store(folded: FoldedBatch) -> BatchResult:
    """Write a folded batch in the caller's transaction, which holds the writer lock."""
    received_at = datetime.now(UTC)
    new_events = insert_new_events(folded.events, received_at=received_at)
    result = BatchResult(new_events=new_events, duplicates=folded.committed - len(folded.rejects) - len(new_events))
    result.rejects = store_rejects(folded.rejects, received_at=received_at)
    keys = write_conversations(folded, now=received_at)
    write_participants(folded.participants, keys)
    result.conversations = ConversationRows(folded.rows, keys)
    result.transitions = folded.transitions
    result.deliveries = outbox.create_deliveries(conversations=result.conversations, transitions=result.transitions)
    save_checkpoint(source=folded.source, last_event_id=folded.last_event_id, committed=folded.committed)
    return result


def insert_new_events(events: Sequence[TypedEvent], *, received_at: datetime) -> list[TypedEvent]:
    """Insert the events (unique by dedupe key) not stored yet and return them. Under the writer lock no other
    batch can store one of them meanwhile."""
    stored = bulk.existing_keys(table=Event._meta.db_table, key="dedupe_key", keys=[e.dedupe_key for e in events])
    new = [event for event in events if event.dedupe_key not in stored]
    bulk.insert_all(table=Event._meta.db_table, columns=EVENT_COLUMNS, rows=[event_values(e, received_at) for e in new])
    return new


def write_conversations(folded: FoldedBatch, *, now: datetime) -> dict[str, Stored]:
    """Upsert the changed rows; return (pk, created_at, updated_at) of every conversation the batch touched."""
    keys = dict(folded.known)
    if folded.changed:
        written = bulk.upsert(
            table=Conversation._meta.db_table,
            columns=["conversation_id", *CONVERSATION_FIELDS, "created_at", "updated_at"],
            rows=[(cid, *folded.rows[cid], now, now) for cid in folded.changed],
            conflict=["conversation_id"], update=[*CONVERSATION_FIELDS, "updated_at"],
            returning=["conversation_id", "id", "created_at"],
        )
        keys.update((cid, (pk, aware(created_at), now)) for cid, pk, created_at in written)
    missing = [cid for cid in folded.rows if cid not in keys]
    if missing:  # touched but unchanged, and first written by a batch folded meanwhile: read its key
        keys.update((cid, (pk, created_at, updated_at)) for cid, pk, created_at, updated_at in
                    Conversation.objects.filter(conversation_id__in=missing).values_list(
                        "conversation_id", "id", "created_at", "updated_at"))
    return keys


def aware(value: datetime) -> datetime:
    """A time RETURNING gives: aware on PostgreSQL, naive UTC from SQLite's raw cursor."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def write_participants(rows: Sequence[tuple], keys: dict[str, Stored]) -> None:
    if rows:
        bulk.upsert(
            table=Participant._meta.db_table,
            columns=["conversation_id", "participant_id", *PARTICIPANT_FIELDS],
            rows=sorted((keys[cid][0], pid, *values) for cid, pid, *values in rows),
            conflict=["conversation_id", "participant_id"], update=PARTICIPANT_FIELDS, returning=["id"],
        )


class ConversationRows(Mapping[str, Conversation]):
    """The conversations a batch touched, as model instances built on first access from the rows just written
    (no read; most batches' listeners never look at most of them)."""

    def __init__(self, rows: dict[str, tuple], keys: dict[str, Stored]) -> None:
        self.rows, self.keys = rows, keys
        self.built: dict[str, Conversation] = {}

    def __getitem__(self, cid: str) -> Conversation:
        instance = self.built.get(cid)
        if instance is None:
            pk, created_at, updated_at = self.keys[cid]
            values = dict(zip(CONVERSATION_FIELDS, self.rows[cid]))
            values.update(id=pk, conversation_id=cid, created_at=created_at, updated_at=updated_at,
                          field_versions=orjson.loads(values["field_versions"]))
            instance = self.built[cid] = Conversation.from_db(
                connection.alias, CONVERSATION_COLUMNS, [values[name] for name in CONVERSATION_COLUMNS])
        return instance

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


EVENT_COLUMNS = (
    "dedupe_key", "sse_id", "kind", "event_type", "conversation_id", "occurred_at", "received_at", "source", "payload",
)


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
        signal = SIGNAL_OF_KIND[event.kind]
        if signal.has_listeners(Conversation):
            signal.send(sender=Conversation, event=event, conversation=result.conversations.get(event.conversation_id))
    for reject in result.rejects:
        signals.stream_error.send(sender=RejectedEvent, reject=reject)
