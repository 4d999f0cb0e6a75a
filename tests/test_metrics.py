"""/metrics: the ingesting process's counters move with each committed batch; database gauges are read at
scrape time; METRICS_TOKEN guards the endpoint when set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from conversations import metrics
from conversations.events import Reject
from conversations.heartbeat import Beat, write_heartbeat
from conversations.models import Conversation, HookDelivery, RejectedEvent, WorkerHeartbeat
from conversations.pipeline import Envelope, Pipeline
from conversations.worker import after_commit_listeners

from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: Client, **headers: str) -> Samples:
    response = client.get("/metrics", HTTP_HOST="10.0.0.9:8000", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_worker_registers_the_metrics_listener() -> None:
    listeners = after_commit_listeners("sse")
    assert any(getattr(listener, "__qualname__", "").startswith("batch_listener") for listener in listeners)


@pytest.mark.django_db(transaction=True)  # Pipeline.commit manages its connection like the worker does
def test_counters_move_when_a_batch_commits_through_the_pipeline(client: Client) -> None:
    before = scrape(client)
    events = [typed(p, sse_id=str(i)) for i, p in enumerate(lifecycle("conv-m1"), start=1)]
    reject = Reject(source="sse", raw="{broken", error="malformed JSON", sse_id="6")
    pipeline = Pipeline(source_name="sse", after_commit=[metrics.batch_listener("sse")])
    batch = [Envelope(e, e.sse_id) for e in events] + [Envelope(events[0], "7"), Envelope(reject, "8")]
    pipeline.commit(batch)
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("monitor_events_ingested_total", kind="start", source="sse") == 1
    assert moved("monitor_events_ingested_total", kind="update", source="sse") == 2
    assert moved("monitor_events_ingested_total", kind="wrapup", source="sse") == 1
    assert moved("monitor_events_duplicate_total", source="sse") == 1
    assert moved("monitor_events_rejected_total", source="sse") == 1
    assert moved("monitor_ingest_batch_size_count", source="sse") == 1
    assert moved("monitor_ingest_batch_size_sum", source="sse") == 7
    assert moved("monitor_ingest_commit_seconds_count", source="sse") == 1
    assert moved("monitor_ingest_commit_seconds_sum", source="sse") > 0
    assert value(after, "monitor_checkpoint_events_committed_total", source="sse") == 7
    assert value(after, "monitor_rejected_events_recent") == 1


def test_stream_lag_and_worker_state_come_from_the_heartbeats(client: Client) -> None:
    at = datetime.now(UTC)
    write_heartbeat(
        worker="w1:10",
        source="sse",
        started_at=at,
        beat=Beat(
            connected=True, last_event_at=at - timedelta(seconds=30), events_committed=12, reconnects=2
        ),
    )
    WorkerHeartbeat.objects.filter(worker="w1:10").update(beat_at=at - timedelta(seconds=4))
    samples = scrape(client)
    labels = {"worker": "w1:10", "source": "sse"}
    assert 30 <= value(samples, "monitor_worker_stream_lag_seconds", **labels) < 60
    assert 4 <= value(samples, "monitor_worker_heartbeat_age_seconds", **labels) < 30
    assert value(samples, "monitor_worker_connected", **labels) == 1
    assert value(samples, "monitor_worker_reconnects", **labels) == 2
    assert value(samples, "monitor_worker_events_committed", **labels) == 12
    assert 4 <= value(samples, "monitor_stream_freshness_seconds") < 30
    assert value(samples, "monitor_stream_stale") == 0


def test_hook_queue_depth_and_outcomes_come_from_the_outbox(client: Client) -> None:
    conversation = Conversation.objects.create(conversation_id="conv-h", state="wrapped_up")
    statuses = ["pending", "pending", "pending", "running", "succeeded", "failed"]
    for n, status in enumerate(statuses):
        HookDelivery.objects.create(
            conversation=conversation,
            trigger="wrapup",
            hook=f"hooks.h{n}",
            status=status,
            idempotency_key=f"key-{n}",
        )
    oldest = HookDelivery.objects.get(hook="hooks.h0")
    HookDelivery.objects.filter(pk=oldest.pk).update(created_at=datetime.now(UTC) - timedelta(seconds=90))
    samples = scrape(client)
    assert value(samples, "monitor_hook_queue_depth") == 3
    assert value(samples, "monitor_hook_running") == 1
    assert value(samples, "monitor_hook_oldest_pending_seconds") >= 90
    outcomes = {
        s: value(samples, "monitor_hook_outcomes_recent", status=s) for s in HookDelivery.Status.values
    }
    assert outcomes == {"pending": 3, "running": 1, "succeeded": 1, "failed": 1}


def test_rows_older_than_the_window_leave_the_recent_counts(client: Client, settings) -> None:  # noqa: ANN001
    settings.METRICS_WINDOW_SECONDS = 600
    RejectedEvent.objects.create(source="sse", raw="x", error="e", received_at=datetime.now(UTC))
    RejectedEvent.objects.create(
        source="sse", raw="y", error="e", received_at=datetime.now(UTC) - timedelta(hours=2)
    )
    assert value(scrape(client), "monitor_rejected_events_recent") == 1


def test_a_metrics_token_is_required_once_set(client: Client, settings) -> None:  # noqa: ANN001
    settings.METRICS_TOKEN = "s3cret-scrape-token"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-scrape-token")


def test_a_scrape_never_counts_the_event_table(client: Client) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        scrape(client)
    statements = [q["sql"].lower() for q in queries.captured_queries]
    assert statements and not any("conversations_event" in sql for sql in statements)
    assert len(statements) <= 10
