"""The two-stage writer (pipeline.FoldAhead, PostgreSQL): folding batch N+1 while batch N is stored gives exactly
the rows one transaction per batch gives, whatever the order, duplicates and batching; another writer that comes
between two batches is folded on, never overwritten; and the cache of conversations in flight is empty once the
batches are stored."""
from __future__ import annotations

import random
import threading

import pytest
from django.db import connection

from conversations import services
from conversations.events import TypedEvent
from conversations.models import Conversation, Event
from conversations.pipeline import Envelope, Pipeline

from tests.factories import lifecycle, payload, typed
from tests.test_derive_properties import snapshot

pytestmark = pytest.mark.django_db(transaction=True)

EVENTS = [typed(p, sse_id=str(i)) for i, p in enumerate(
    [e for n in range(12) for e in lifecycle(f"conv-{n}", offset=n * 3)], start=1)]


@pytest.fixture(autouse=True)
def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("folding ahead is for PostgreSQL (SQLite has one connection writing at a time)")


def expected_rows(events: list[TypedEvent]) -> dict:
    services.ingest_batch(events=events, source="sse")
    rows = snapshot()
    Conversation.objects.all().delete()
    Event.objects.all().delete()
    return rows


def run(events: list[TypedEvent], *, batch_size: int, after_commit=()) -> Pipeline:  # noqa: ANN001
    pipeline = Pipeline(source_name="sse", batch_size=batch_size, max_age=0.05, fold_ahead=True,
                        after_commit=after_commit)
    pipeline.start_reader(Envelope(event, event.sse_id) for event in events)
    pipeline.run(stop=threading.Event())
    return pipeline


@pytest.mark.parametrize("seed", range(4))
def test_folding_ahead_stores_what_one_transaction_per_batch_stores(seed: int) -> None:
    rng = random.Random(seed)
    order = EVENTS + rng.sample(EVENTS, 15)  # with duplicates
    rng.shuffle(order)
    expected = expected_rows(EVENTS)
    pipeline = run(order, batch_size=rng.choice([3, 5, 8]))
    assert snapshot() == expected
    stage = pipeline.stage
    assert pipeline.totals.new_events == len(EVENTS)
    assert pipeline.totals.duplicates == 15
    # Folded again under the lock: only the first batch, and the two folded beside it before it was stored.
    assert stage.fresh >= pipeline.totals.batches - 3
    assert stage.fresh > 0
    assert len(stage.cache) == 0


def test_another_writer_between_a_fold_and_its_store_is_folded_on_not_overwritten(monkeypatch) -> None:  # noqa: ANN001
    # Events in time order across conversations, so conv-0 has one event in every few batches. Right after the
    # fold of its second event has read conv-0, a backfill (another writer) stores a newer queue name for it:
    # the batch folded on the old read must not overwrite it.
    order = sorted(EVENTS, key=lambda e: (e.occurred_at, e.dedupe_key))
    backfilled = typed(payload("update", "conv-0", 45, queueId="queue-escalations", queueName="Escalations"))
    expected = expected_rows([*EVENTS, backfilled])
    loads = {"conv-0": 0}
    original = services.FoldCache.load

    def load_then_backfill(cache: services.FoldCache, ids):  # noqa: ANN001, ANN202
        states = original(cache, ids)
        if "conv-0" in ids:
            loads["conv-0"] += 1
            if loads["conv-0"] == 2:
                services.ingest_batch(events=[backfilled], source="backfill")
        return states

    monkeypatch.setattr(services.FoldCache, "load", load_then_backfill)
    pipeline = run(order, batch_size=4)
    assert loads["conv-0"] >= 2
    conversation = Conversation.objects.get(conversation_id="conv-0")
    assert conversation.queue_name == "Escalations"  # the backfilled statement is the newest: it survived
    assert snapshot() == expected
    assert pipeline.stage.refolds >= 2  # the first batch, and the one folded before the other writer
    assert len(pipeline.stage.cache) == 0


@pytest.mark.parametrize("seed", range(3))
def test_a_writer_racing_the_pipeline_changes_nothing_of_the_result(seed: int) -> None:
    # A backfill storing newer statements for the same conversations in its own thread, at random moments, while
    # the pipeline folds ahead: the rows must be those of all events stored one batch at a time.
    rng = random.Random(seed)
    order = sorted(EVENTS, key=lambda e: (e.occurred_at, e.dedupe_key))
    racing = [typed(payload("update", f"conv-{rng.randrange(12)}", 100 + n, queueId=f"queue-{n}",
                            queueName=f"Queue {n}")) for n in range(24)]
    expected = expected_rows([*EVENTS, *racing])

    def race() -> None:
        try:
            for start in range(0, len(racing), 3):
                threading.Event().wait(rng.uniform(0, 0.03))
                services.ingest_batch(events=racing[start:start + 3], source="backfill")
        finally:
            connection.close()

    racer = threading.Thread(target=race)
    racer.start()
    pipeline = run(order, batch_size=3)
    racer.join(30)
    assert snapshot() == expected
    assert pipeline.totals.new_events == len(EVENTS)
    assert len(pipeline.stage.cache) == 0
