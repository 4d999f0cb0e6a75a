"""/healthz, /readyz and `stream_status`, read from the heartbeats stream workers write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client

from conversations.genesys.sse import SourceStats
from conversations.heartbeat import Beat, Heartbeat, SourceWatch, write_heartbeat
from conversations.models import WorkerHeartbeat

pytestmark = pytest.mark.django_db


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def beat(worker: str = "host-a:1", *, beat_age: float, event_age: float | None, connected: bool) -> None:
    """A heartbeat as a worker would have written it `beat_age` seconds ago."""
    write_heartbeat(
        worker=worker,
        source="sse",
        started_at=ago(3600),
        beat=Beat(
            connected=connected,
            last_event_at=None if event_age is None else ago(event_age),
            events_committed=42,
            reconnects=3,
        ),
    )
    WorkerHeartbeat.objects.filter(worker=worker).update(beat_at=ago(beat_age))


def test_healthz_answers_without_the_database_or_an_allowed_host(client: Client) -> None:
    with connection.execute_wrapper(refuse_queries):
        response = client.get("/healthz", HTTP_HOST="10.20.30.40:8000")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def refuse_queries(*args: object) -> None:
    raise AssertionError("/healthz must not touch the database")


def test_readyz_is_ready_while_a_connected_worker_beats(client: Client, settings) -> None:  # noqa: ANN001
    settings.STREAM_STALE_SECONDS = 120
    beat(beat_age=2, event_age=3000, connected=True)  # a quiet night: no events, the stream is up
    response = client.get("/readyz", HTTP_HOST="10.20.30.40")
    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["database"], body["stream"]["worker"]) == ("ready", "ok", "host-a:1")
    assert body["stream"]["age_seconds"] < 120


def test_readyz_turns_unready_when_the_stream_goes_stale(client: Client, settings) -> None:  # noqa: ANN001
    settings.STREAM_STALE_SECONDS = 120
    beat(beat_age=2, event_age=5, connected=True)
    assert client.get("/readyz").status_code == 200
    beat(beat_age=600, event_age=700, connected=True)  # the worker stopped beating ten minutes ago
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "unready" and body["database"] == "ok"
    assert body["reason"].startswith("stream stale: worker host-a:1 (sse) last alive 600s ago")


def test_a_beating_but_disconnected_worker_is_stale_once_its_last_event_is_old(
    client: Client,
    settings,  # noqa: ANN001
) -> None:
    settings.STREAM_STALE_SECONDS = 120
    beat(beat_age=1, event_age=30, connected=False)
    assert client.get("/readyz").status_code == 200
    beat(beat_age=1, event_age=300, connected=False)
    response = client.get("/readyz")
    assert response.status_code == 503 and "(disconnected)" in response.json()["reason"]


def test_any_one_live_worker_keeps_the_stream_fresh(client: Client, settings) -> None:  # noqa: ANN001
    settings.STREAM_STALE_SECONDS = 120
    beat("old-host:7", beat_age=5000, event_age=5000, connected=True)
    beat("new-host:1", beat_age=1, event_age=None, connected=True)
    assert client.get("/readyz").json()["stream"]["worker"] == "new-host:1"


def test_readyz_without_any_heartbeat_says_so(client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"] == "stream stale: no stream worker has written a heartbeat"


def test_a_zero_threshold_turns_the_stream_check_off(client: Client, settings) -> None:  # noqa: ANN001
    settings.STREAM_STALE_SECONDS = 0
    assert client.get("/readyz").status_code == 200


def test_stream_status_prints_each_worker_and_check_fails_when_stale(settings) -> None:  # noqa: ANN001
    settings.STREAM_STALE_SECONDS = 120
    beat("host-a:1", beat_age=2, event_age=4, connected=True)
    beat("host-b:9", beat_age=900, event_age=950, connected=False)
    out = StringIO()
    call_command("stream_status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "worker",
        "source",
        "beat",
        "connected",
        "last",
        "event",
        "committed",
        "reconnects",
    ]
    assert lines[1].split() == ["host-a:1", "sse", "2s", "yes", "4s", "42", "3"]
    assert lines[2].split() == ["host-b:9", "sse", "15m", "no", "16m", "42", "3"]
    assert lines[3].startswith("stream fresh: worker host-a:1")
    call_command("stream_status", check=True, stdout=StringIO())  # fresh: no error

    WorkerHeartbeat.objects.filter(worker="host-a:1").update(beat_at=ago(400), last_event_at=ago(400))
    with pytest.raises(CommandError, match="stream stale: worker host-a:1") as failure:
        call_command("stream_status", check=True, stdout=StringIO())
    assert failure.value.returncode == 1


def test_stream_status_this_host_looks_only_at_this_hosts_workers(settings) -> None:  # noqa: ANN001
    import socket

    settings.STREAM_STALE_SECONDS = 120
    beat("elsewhere:1", beat_age=1, event_age=1, connected=True)
    with pytest.raises(CommandError, match="no stream worker"):
        call_command("stream_status", check=True, this_host=True, stdout=StringIO())
    beat(f"{socket.gethostname()}:55", beat_age=1, event_age=1, connected=True)
    call_command("stream_status", check=True, this_host=True, stdout=StringIO())


def test_the_heartbeat_counts_committed_batches_and_says_disconnected_when_it_stops() -> None:
    from conversations.services import BatchResult

    heartbeat = Heartbeat(source_name="sse", worker="unit:1", interval=60)
    with heartbeat.running():
        heartbeat.record_batch(BatchResult(duplicates=5))
        heartbeat.record_batch(BatchResult(duplicates=2))
        heartbeat.beat()
        row = WorkerHeartbeat.objects.get(worker="unit:1")
        assert (row.events_committed, row.source, row.last_event_at is not None) == (7, "sse", True)
    row.refresh_from_db()
    assert row.connected is False and row.events_committed == 7


def test_the_source_watch_follows_connects_drops_and_messages() -> None:
    stats, watch = SourceStats(), SourceWatch()
    t0 = datetime(2026, 11, 28, 9, tzinfo=UTC)
    assert watch.sample(stats, t0) == (False, 0) and watch.last_message_at is None
    stats.reconnects = 2  # two failed attempts before the first connection
    assert watch.sample(stats, t0 + timedelta(seconds=5)) == (False, 2)
    stats.connects, stats.last_connected_at, stats.messages = 1, t0 + timedelta(seconds=6), 3
    assert watch.sample(stats, t0 + timedelta(seconds=10)) == (True, 0)
    assert watch.last_message_at == t0 + timedelta(seconds=10)
    stats.reconnects = 3  # the stream dropped
    assert watch.sample(stats, t0 + timedelta(seconds=15)) == (False, 1)
    stats.reconnects, stats.connects, stats.last_connected_at = 4, 2, t0 + timedelta(seconds=19)
    assert watch.sample(stats, t0 + timedelta(seconds=20)) == (True, 1)  # dropped again and came back
    assert watch.last_message_at == t0 + timedelta(seconds=10)  # no message since
