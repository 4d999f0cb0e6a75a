"""What the ingest hot path's speed-ups must not change: set-based reads give what the ORM gives, the staging
tables survive a rolled-back batch, hook ids leave in one message per batch, and the indexes the admin and
the history need are still there."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from conversations import bulk, outbox, services
from conversations.models import Conversation, Event, HookDelivery, Participant

from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db(transaction=True)


def ingest(payloads: list[dict]) -> services.BatchResult:
    return services.ingest_batch(events=[typed(p) for p in payloads], source="sse")


def test_select_in_reads_what_the_orm_reads() -> None:
    ingest(lifecycle("conv-1") + lifecycle("conv-2", offset=30))
    columns = ("id", "conversation_id", "state", "started_at", "wrapped_up_at", "field_versions", "created_at")
    rows = bulk.select_in(model=Conversation, columns=columns, key="conversation_id", keys=["conv-1", "conv-2", "x"])
    expected = list(Conversation.objects.filter(conversation_id__in=["conv-1", "conv-2"]).values(*columns))
    assert sorted(rows, key=lambda r: r["id"]) == sorted(expected, key=lambda r: r["id"])
    pks = [row["id"] for row in rows]
    participants = bulk.select_in(model=Participant, columns=("conversation_id", "participant_id", "connected_at"),
                                  key="conversation_id", keys=pks)
    assert len(participants) == Participant.objects.count() == 6


def test_the_conversations_a_batch_returns_equal_the_stored_rows() -> None:
    result = ingest(lifecycle("conv-1"))
    returned = result.conversations["conv-1"]
    stored = Conversation.objects.get(conversation_id="conv-1")
    for field in Conversation._meta.concrete_fields:
        assert getattr(returned, field.attname) == getattr(stored, field.attname), field.name
    assert not returned._state.adding  # a row that exists, as if read


def test_a_batch_rolled_back_after_its_first_write_leaves_the_next_batch_working() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        ingest(lifecycle("conv-1"))  # the first write of this connection creates the staging tables
        raise RuntimeError("the batch fails after writing")
    result = ingest(lifecycle("conv-2"))
    assert list(result.conversations) == ["conv-2"]
    assert Event.objects.filter(conversation_id="conv-1").count() == 0


def test_two_writes_to_one_table_in_one_transaction_stay_separate() -> None:
    with transaction.atomic():
        first = ingest(lifecycle("conv-1"))
        second = ingest(lifecycle("conv-1") + lifecycle("conv-2", offset=40))
    assert len(first.new_events) == 5 and len(second.new_events) == 5 and second.duplicates == 5


def test_deliveries_already_written_are_not_returned_again() -> None:
    first = ingest(lifecycle("conv-1"))
    again = services.ingest_batch(events=[typed(p) for p in lifecycle("conv-1", offset=0.5)], source="sse")
    assert len(first.deliveries) == HookDelivery.objects.count() > 0
    assert again.deliveries == []
    delivery = first.deliveries[0]
    assert delivery.conversation.conversation_id == "conv-1" and not delivery._state.adding


def broker_url_or_skip() -> str:
    from monitor_project.celery import app

    if app.conf.task_always_eager:
        pytest.skip("needs a Celery broker (REDIS_URL)")
    return app.conf.broker_url


def test_a_batch_of_hook_deliveries_leaves_as_one_broker_message_and_is_stamped_sent() -> None:
    import redis

    from conversations.bench import bench_queue

    url = broker_url_or_skip()
    results = [ingest(lifecycle(f"conv-{n}", offset=n)) for n in range(3)]
    ids = [d.pk for result in results for d in result.deliveries]
    HookDelivery.objects.update(enqueued_at=None)
    with bench_queue() as queue:
        assert outbox.enqueue(ids) == len(ids) > 1
        assert redis.Redis.from_url(url).llen(queue) == 1  # one deliver_hooks message, fanned out by a worker
    assert HookDelivery.objects.filter(enqueued_at__isnull=True).count() == 0


def index_columns(table: str) -> list[list[str]]:
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, table)
    return [c["columns"] for c in found.values() if (c["index"] or c["unique"]) and not c["primary_key"]]


def test_every_admin_filter_and_the_history_order_keep_an_index() -> None:
    event = index_columns("conversations_event")
    for columns in (["kind", "occurred_at"], ["source", "occurred_at"], ["event_type", "occurred_at"],
                    ["conversation_id", "occurred_at"], ["occurred_at"], ["received_at"]):
        assert columns in event
    assert ["kind"] not in event and ["source"] not in event
    conversation = index_columns("conversations_conversation")
    assert ["started_at", "id"] in conversation and ["started_at"] not in conversation
    assert ["conversation_id", "participant_id"] in index_columns("conversations_participant")


@pytest.mark.skipif("connection.vendor != 'postgresql'")
def test_no_prefix_search_indexes_are_left_on_the_ingest_tables() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename IN ('conversations_event', "
                       "'conversations_conversation', 'conversations_participant') AND indexname LIKE '%%_like'")
        assert cursor.fetchall() == []


def test_a_delivery_stamp_never_relaxes_an_enclosing_transaction() -> None:
    result = ingest(lifecycle("conv-1"))
    with transaction.atomic():
        outbox.mark_sent([d.pk for d in result.deliveries])
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SHOW synchronous_commit")
                assert cursor.fetchone()[0] == "on"
    assert HookDelivery.objects.filter(enqueued_at__isnull=True).count() == 0
    assert all(d.created_at <= d.enqueued_at + timedelta(seconds=1) for d in HookDelivery.objects.all())


def test_a_connection_lost_during_a_copy_reaches_the_writer_as_djangos_error() -> None:
    # The writer's retry (pipeline.retrying) holds a batch through a database outage only for Django's
    # OperationalError / InterfaceError; COPY is the driver's own and must be wrapped like execute() is.
    if connection.vendor != "postgresql":
        pytest.skip("COPY is the PostgreSQL path")
    from django.db import InterfaceError, OperationalError, connections

    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        other.close()
    with pytest.raises((OperationalError, InterfaceError)):
        bulk.insert_all(table=Event._meta.db_table, columns=services.EVENT_COLUMNS,
                        rows=[services.event_values(typed(lifecycle("conv-1")[0]), timezone.now())])
    connection.close()
