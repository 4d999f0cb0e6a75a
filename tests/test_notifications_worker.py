"""`manage.py stream_events --source notifications` end to end: the simulator over loopback HTTP and WebSocket,
the real pipeline, the database, the connection history."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from conversations.genesys.scenario import QUEUES
from conversations.genesys.simulator import Simulator
from conversations.genesys.simulator_notifications import queue_topic
from conversations.models import Conversation, Event, StreamConnection

from tests.factories import wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)



def feed_once_subscribed(sim: Simulator, payloads: list[dict[str, Any]], *, topics: int = 6) -> threading.Thread:
    """In the background: wait until a worker's channel is subscribed, then play lifecycles like a live org."""

    def feed() -> None:
        hub = sim.notifications
        wait_for(lambda: hub.channel_ids() and len(hub.topics(hub.channel_ids()[0])) >= topics
                 and hub.stats["open_sockets"].get(hub.channel_ids()[0]), what="a subscribed channel with a socket")
        for payload in payloads:
            sim.append(payload)
            time.sleep(0.01)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def test_stream_events_reads_the_notifications_source_until_max_events(
    simulator: Simulator, genesys_settings,  # noqa: ANN001
) -> None:
    settings.GENESYS = replace(genesys_settings, notifications_sync_interval=0.05)
    feeder = feed_once_subscribed(simulator, simulator.scenario.timeline(5))
    call_command("stream_events", source="notifications", max_events=20)
    feeder.join(timeout=10)
    assert Event.objects.filter(source="notifications").count() >= 10  # 20 committed, duplicates included
    assert Conversation.objects.exists()
    connection = StreamConnection.objects.get(source="notifications")
    assert connection.channel_id == simulator.notifications.channel_ids()[0]
    assert connection.disconnected_at is not None and connection.events_received >= 20
    assert simulator.notifications.wait_for_sockets(0, timeout=5)  # the socket was closed on the way out


def test_a_client_without_permission_for_its_topics_stops_with_one_line(
    simulator: Simulator, genesys_settings,  # noqa: ANN001
) -> None:
    simulator.notifications.denied_topics = ["*"]
    with pytest.raises(CommandError) as failure:
        call_command("stream_events", source="notifications", max_events=1)
    message = str(failure.value)
    assert "rejected every queue and user topic" in message and "\n" not in message


def test_the_worker_process_takes_its_source_and_queues_from_the_environment_and_stops_on_sigterm(
    simulator: Simulator, worker_env: dict[str, str],
) -> None:
    simulator.notifications.heartbeat_interval = 0.2
    payloads = simulator.scenario.timeline(20)
    queue = next(q for q in QUEUES if q.id == payloads[0]["queueId"])  # a queue with traffic
    env = {**worker_env, "GENESYS_EVENT_SOURCE": "notifications", "GENESYS_QUEUE_IDS": f" {queue.id}, ",
           "GENESYS_NOTIFICATIONS_SYNC_INTERVAL": "0.05"}
    worker = subprocess.Popen([sys.executable, "manage.py", "stream_events"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        feed_once_subscribed(simulator, payloads, topics=1)
        hub = simulator.notifications
        wait_for(lambda: Event.objects.filter(source="notifications").count() >= 5 or worker.poll() is not None,
                 what="events stored")
        assert {t for t in hub.topics(hub.channel_ids()[0]) if not t.startswith("v2.detail.")} == {
            queue_topic(queue.id)}
        wait_for(lambda: hub.stats["heartbeats_sent"] >= 2, what="heartbeats")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=20)
    assert worker.returncode == 0, err[-3000:]
    connection = StreamConnection.objects.get(source="notifications")
    assert connection.disconnect_reason == "worker stopping" and connection.worker.endswith(f":{worker.pid}")
    assert connection.last_heartbeat_at is not None
