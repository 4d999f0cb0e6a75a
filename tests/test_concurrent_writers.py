"""Two writers folding the same conversation at once (the worker and a backfill run by hand, or a reprocess from
the admin): the second waits for the first and folds on top of its result instead of overwriting it."""
from __future__ import annotations

import threading

import pytest
from django.db import connection, connections, transaction

from conversations import services
from conversations.models import Conversation

from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_second_writer_folds_on_top_of_an_uncommitted_first_one() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SQLite has one writer at a time; the race needs PostgreSQL")
    start, end = (typed(p) for p in (lifecycle("conv-1")[0], lifecycle("conv-1")[3]))
    first_wrote, second_started = threading.Event(), threading.Event()

    def first() -> None:
        try:
            with transaction.atomic():
                services.write_batch(events=[start], rejects=[], source="sse", last_event_id=None)
                first_wrote.set()
                second_started.wait(5)
                threading.Event().wait(0.5)  # the second writer is now blocked on this batch's rows
        finally:
            connections.close_all()

    def second() -> None:
        first_wrote.wait(5)
        second_started.set()
        try:
            services.ingest_batch(events=[end], source="backfill")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    conversation = Conversation.objects.get(conversation_id="conv-1")
    assert conversation.state == "ended"
    assert conversation.started_at.isoformat() == "2026-11-28T09:00:00+00:00"  # the first writer's start survived
    assert conversation.queue_name == "Support"
