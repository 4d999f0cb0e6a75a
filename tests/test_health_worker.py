"""A real `manage.py stream_events` against the simulator: its heartbeat row, its own metrics port, and what
/readyz and `stream_status --check` make of them before and after it stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from conversations.models import WorkerHeartbeat

from tests.factories import wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def worker_counters(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("kind", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("source") == "sse"
    }


def test_a_running_worker_beats_serves_its_counters_and_reads_stale_once_stopped(
    simulator,  # noqa: ANN001
    worker_env,  # noqa: ANN001
    settings,  # noqa: ANN001
) -> None:
    payloads = simulator.generate(conversations=4)
    port = free_port()
    env = {**worker_env, "METRICS_PORT": str(port), "HEARTBEAT_INTERVAL": "0.2"}
    process = subprocess.Popen(
        [sys.executable, "manage.py", "stream_events"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def caught_up() -> bool:
            row = WorkerHeartbeat.objects.filter(worker__endswith=f":{process.pid}").first()
            return row is not None and row.connected and row.events_committed == len(payloads)

        wait_for(caught_up)
        row = WorkerHeartbeat.objects.get(worker__endswith=f":{process.pid}")
        assert row.source == "sse" and row.last_event_at is not None and row.reconnects == 0

        counters = worker_counters(port)
        kinds = {"start", "update", "end", "wrapup"}
        assert sum(counters.get(("monitor_events_ingested_total", k), 0) for k in kinds) == len(payloads)
        assert counters[("monitor_stream_connected", "")] == 1
        assert counters[("monitor_ingest_commit_seconds_count", "")] >= 1

        settings.STREAM_STALE_SECONDS = 30
        assert Client().get("/readyz").status_code == 200
        call_command("stream_status", check=True, stdout=StringIO())
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr

    row.refresh_from_db()
    assert row.connected is False  # the last beat says the stream is gone
    settings.STREAM_STALE_SECONDS = 0.5
    time.sleep(0.6)  # past the threshold: the stopped worker's stream is now stale
    assert Client().get("/readyz").status_code == 503
    with pytest.raises(CommandError, match="stream stale"):
        call_command("stream_status", check=True, stdout=StringIO())
