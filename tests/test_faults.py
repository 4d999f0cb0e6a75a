"""Fault injection against the real worker process: each case counts events sent, events stored, duplicates
and hook deliveries. Every case must end with lost = 0, duplicate events = 0, duplicate hook deliveries = 0."""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from django.db.models import Count

from conversations.models import Conversation, Event, HookDelivery, StreamConnection
from conversations.normalize import dedupe_key

from tests.factories import wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen:
    """Output goes to a file, not a pipe: a chatty worker must never block on a pipe nobody reads yet."""
    log = tempfile.TemporaryFile(mode="w+")
    worker = subprocess.Popen([sys.executable, "manage.py", "stream_events", *args], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    worker.log = log  # type: ignore[attr-defined]
    return worker


def output_of(worker: subprocess.Popen) -> str:
    worker.log.seek(0)  # type: ignore[attr-defined]
    return worker.log.read()  # type: ignore[attr-defined]



def stop_worker(worker: subprocess.Popen) -> str:
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=20)
    err = output_of(worker)
    assert worker.returncode == 0, err[-3000:]
    return err


def counts(sent: int | list[dict], source: str = "sse") -> dict[str, int]:
    """sent: the payloads sent (each once), or just how many when they are not known one by one."""
    stored = Event.objects.count()
    keys = set(Event.objects.values_list("dedupe_key", flat=True))
    if isinstance(sent, list):
        lost = len({dedupe_key(source, p) for p in sent} - keys)
        sent = len(sent)
    else:
        lost = sent - len(keys)
    repeated = HookDelivery.objects.values("conversation_id", "trigger", "hook").annotate(n=Count("id")).filter(n__gt=1)
    return {"sent": sent, "stored": stored, "lost": lost, "duplicate_events": stored - len(keys),
            "hook_deliveries": HookDelivery.objects.count(), "duplicate_deliveries": repeated.count()}


def assert_nothing_lost_or_doubled(case: str, result: dict[str, int], report: list) -> None:  # noqa: ANN001
    report.append((case, result))
    assert result["lost"] == result["duplicate_events"] == result["duplicate_deliveries"] == 0, result


def block_database(name: str, *, blocked: bool) -> None:
    """From the worker's point of view, a database outage: its connections are cut and new ones refused.
    (Issued from the maintenance database; the test's own connection is spared so it can count afterwards.)"""
    conf = connection.settings_dict
    with psycopg.connect(host=conf["HOST"] or "127.0.0.1", port=conf["PORT"] or 5432, user=conf["USER"] or "postgres",
                         dbname="postgres", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"false" if blocked else "true"}')
        if blocked:
            own = connection.cursor().connection.info.backend_pid
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                          [name, own])


def test_a_database_outage_mid_stream_loses_nothing(simulator, worker_env, fault_report) -> None:  # noqa: ANN001
    if connection.vendor != "postgresql":
        pytest.skip("cuts PostgreSQL connections; runs in the PostgreSQL pass")
    name = connection.settings_dict["NAME"]
    worker = start_worker({**worker_env, "INGEST_BATCH_SIZE": "5"})
    try:
        simulator.start_live(rate=40)
        wait_for(lambda: Event.objects.count() >= 20, what="the first events")
        block_database(name, blocked=True)
        time.sleep(3)
        block_database(name, blocked=False)
        time.sleep(1)
        simulator.stop_live()
        sent = simulator.stats["appended"]
        wait_for(lambda: Event.objects.count() >= sent, what="every event stored")
    finally:
        block_database(name, blocked=False)
        err = stop_worker(worker)
    assert_nothing_lost_or_doubled("PostgreSQL connections cut mid-stream", counts(sent), fault_report)
    assert "database unavailable" in err


def test_sigkill_mid_stream_then_restart_resumes_from_the_checkpoint(simulator, worker_env, fault_report) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=150)
    env = {**worker_env, "INGEST_BATCH_SIZE": "20", "STREAM_LEASE_SECONDS": "2"}
    first = start_worker(env)
    wait_for(lambda: Event.objects.count() >= 100, what="the first batches")
    first.kill()  # SIGKILL: no flush, no checkpoint save, no lease release
    first.wait(timeout=10)
    killed_at = Event.objects.count()
    second = start_worker(env)
    try:
        wait_for(lambda: Event.objects.count() >= len(payloads), what="every event after the restart")
    finally:
        stop_worker(second)
    assert killed_at < len(payloads)
    assert_nothing_lost_or_doubled("SIGKILL mid-stream, then restart", counts(payloads), fault_report)
    assert Conversation.objects.exclude(state="wrapped_up").count() == 0


def test_a_second_worker_stands_by_and_takes_over_when_the_first_dies(simulator, worker_env, fault_report) -> None:  # noqa: ANN001
    env = {**worker_env, "INGEST_BATCH_SIZE": "10", "STREAM_LEASE_SECONDS": "2"}
    first = start_worker(env)
    simulator.start_live(rate=30)
    wait_for(lambda: Event.objects.count() >= 15, what="the first worker's events")
    second = start_worker(env)
    time.sleep(2.5)  # longer than the lease: the standby must still not consume while the first lives
    assert StreamConnection.objects.filter(source="sse").values("worker").distinct().count() == 1
    first.kill()
    killed = time.time()
    wait_for(lambda: StreamConnection.objects.filter(source="sse").values("worker").distinct().count() == 2,
             what="the standby to take over")
    took_over = time.time() - killed
    time.sleep(1)
    simulator.stop_live()
    sent = simulator.stats["appended"]
    wait_for(lambda: Event.objects.count() >= sent, what="every event stored")
    err = stop_worker(second)
    assert "standing by" in err and "acquired" in err
    assert took_over < 10
    assert_nothing_lost_or_doubled("second worker beside the first", counts(sent), fault_report)


def stream_in_process(max_events: int) -> None:
    from django.core.management import call_command

    call_command("stream_events", max_events=max_events)


def test_a_429_storm_and_5xx_are_ridden_out(simulator, genesys_settings, fault_report) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=20)
    simulator.fail_next(429, count=4, retry_after=1)
    simulator.fail_next(503, count=2)
    stream_in_process(len(payloads))
    assert simulator.stats["statuses"].count(429) == 4
    assert_nothing_lost_or_doubled("429 storm (Retry-After) and 503", counts(payloads), fault_report)


def test_connections_dropped_mid_event_lose_nothing(simulator, genesys_settings, fault_report) -> None:  # noqa: ANN001
    payloads = simulator.generate(conversations=20)
    for position in (3, 10, 25):
        simulator.drop_after(position)
    stream_in_process(len(payloads))
    assert_nothing_lost_or_doubled("network dropped mid-event (x3)", counts(payloads), fault_report)


def test_duplicated_and_reordered_delivery_stores_each_event_once(simulator, genesys_settings, fault_report) -> None:  # noqa: ANN001
    simulator.duplicate_rate = 0.3
    simulator.reorder_window = 4
    payloads = simulator.generate(conversations=30)
    stream_in_process(simulator.stats["appended"])
    assert_nothing_lost_or_doubled("duplicated and reordered delivery", counts(payloads), fault_report)
    assert Conversation.objects.exclude(state="wrapped_up").count() == 0
