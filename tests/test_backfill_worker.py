"""The real Notifications worker loses nothing to its gaps: what happened while no socket heard it (the worker
was down, or its socket went silent, then dropped) is backfilled from the analytics details query onto the
worker's own pipeline, so those conversations reach the state the live stream would have given them, and their
hooks run once.

Conversations are played at the wall clock, a step at a time, across three stretches: a first worker run,
a downtime with no worker at all, and a second run whose socket is silenced (hub.paused), then dropped. The
truth is the SSE stream of the same story, read into a fresh database afterwards.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from conversations.genesys.scenario import ConversationScript, Scenario
from conversations.genesys.simulator import Simulator
from conversations.models import Conversation, Event, HookDelivery, StreamConnection
from conversations.worker import Worker

from tests.test_outbox import CALLS, RECORD, calls
from tests.test_sources_agree import derived_state, forget_everything, quiet, run_sse_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent

HOOKS = {"end": [RECORD], "wrapup": [RECORD]}


@pytest.fixture
def simulator() -> Simulator:
    sim = Simulator(client_id="sim-client", client_secret="sim-secret", seed=11)
    sim.notifications.heartbeat_interval = 0.2
    return sim


@pytest.fixture(autouse=True)
def worker_settings(settings: Any, genesys_settings: Any) -> Iterator[None]:
    from monitor_project.celery import app

    settings.GENESYS = replace(genesys_settings, notifications_sync_interval=0.05)
    settings.GENESYS_BACKFILL_DELAY = 0.0  # the simulator's records do not lag
    settings.GENESYS_BACKFILL_MARGIN = 2.0  # the story takes seconds: a gap's window is about the gap itself
    settings.CONVERSATION_HOOKS = HOOKS
    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True  # hooks run in the worker's process, recorded by the test hook
    CALLS.clear()
    yield
    app.conf.task_always_eager = previous


class Story:
    """Conversations told at the wall clock, one step at a time, into the simulator."""

    def __init__(self, sim: Simulator, count: int) -> None:
        self.sim = sim
        scenario = Scenario(seed=5, reject_rate=0.3)
        self.scripts: list[ConversationScript] = [scenario.script() for _ in range(count)]
        self.told: list[dict[str, Any]] = []

    def play(self, index: int, until: str = "conversation:wrapup") -> None:
        """Tell conversation `index` up to and including its next `until` event."""
        script = self.scripts[index]
        while not script.done:
            payload = script.next_event(datetime.now(UTC))
            self.sim.append(payload)
            self.told.append(payload)
            if payload["eventType"] == until:
                return

    def ids(self, *indexes: int) -> list[str]:
        return [self.scripts[i].conversation_id for i in indexes]


class RunningWorker:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        try:
            Worker(source_name="notifications", stop=self.stop).run()
        finally:
            connection.close()  # the worker thread's own

    def __enter__(self) -> RunningWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=20)


def subscribed(sim: Simulator) -> Callable[[], bool]:
    hub = sim.notifications

    def ready() -> bool:
        channels = hub.channel_ids()
        if not channels:
            return False
        return len(hub.topics(channels[-1])) >= 6 and bool(hub.stats["open_sockets"].get(channels[-1]))

    return ready


def states(*conversation_ids: str) -> dict[str, str]:
    rows = Conversation.objects.filter(conversation_id__in=conversation_ids)
    return dict(rows.values_list("conversation_id", "state"))


def reached(ids: list[str], state: str) -> Callable[[], bool]:
    return lambda: states(*ids) == dict.fromkeys(ids, state)


def test_what_the_worker_missed_while_down_or_disconnected_is_backfilled_with_its_hooks_once(
    simulator: Simulator, fault_report: list,
) -> None:
    story, hub = Story(simulator, 10), simulator.notifications

    with RunningWorker():  # first run: four conversations start, one goes all the way
        wait_for(subscribed(simulator), what="the first worker subscribed")
        for i in range(4):
            story.play(i, until="conversation:update")
        story.play(4)
        wait_for(reached(story.ids(4), "wrapped_up"), what="the live conversation wrapped up")
        wait_for(lambda: len(states(*story.ids(0, 1, 2, 3))) == 4, what="the live starts stored")

    # Downtime, no worker: conversations end, wrap up, or happen entirely.
    story.play(0)
    story.play(1)
    story.play(2, until="conversation:end")
    story.play(5)
    story.play(6, until="conversation:update")

    with RunningWorker():
        wait_for(subscribed(simulator), what="the second worker subscribed")
        wait_for(reached(story.ids(0, 1, 5), "wrapped_up"), what="the downtime backfilled")
        assert states(*story.ids(2, 6)) == {story.ids(2)[0]: "ended", story.ids(6)[0]: "active"}
        for i in (2, 3, 6):  # back live
            story.play(i)
        wait_for(reached(story.ids(2, 3, 6), "wrapped_up"), what="the live wrap-ups")

        hub.paused = True  # the socket goes silent: nothing reaches the worker, then it drops
        story.play(7)
        story.play(8, until="conversation:end")
        opened = hub.stats["sockets_opened"]
        hub.drop_socket()
        wait_for(lambda: hub.stats["sockets_opened"] > opened, what="the worker to reconnect")
        hub.paused = False
        wait_for(reached(story.ids(7), "wrapped_up"), what="the reconnect gap backfilled")
        story.play(8)
        story.play(9)
        wait_for(reached(story.ids(*range(10)), "wrapped_up"), what="every conversation wrapped up")
        wait_for(quiet, what="the last events committed")

    gap_conversations = set(story.ids(0, 1, 2, 5, 6, 7, 8))
    backfilled = set(Event.objects.filter(source="backfill").values_list("conversation_id", flat=True))
    assert gap_conversations <= backfilled
    assert hub.stats["lost_while_paused"] > 0  # the silent socket lost events for real
    assert StreamConnection.objects.filter(source="notifications").count() >= 3
    keys = list(Event.objects.values_list("dedupe_key", flat=True))
    assert len(keys) == len(set(keys))  # no event stored twice
    every = story.ids(*range(10))
    assert HookDelivery.objects.count() == 10 * 2
    assert set(HookDelivery.objects.values_list("status", flat=True)) == {"succeeded"}
    once = Counter({(cid, trigger): 1 for cid in every for trigger in ("end", "wrapup")})
    assert Counter((c, t) for _, c, t, _ in calls()) == once
    with_gaps = derived_state()
    stored = len(keys)
    forget_everything()

    run_sse_worker(len(story.told))  # the truth: the same story, streamed without a gap
    truth = derived_state()
    lost = [cid for cid in every if with_gaps["conversations"].get(cid) != truth["conversations"][cid]]
    fault_report.append(("Notifications: downtime + dropped socket, backfilled", {
        "sent": len(story.told), "stored": stored, "lost": len(lost), "duplicate_events": 0,
        "hook_deliveries": 20, "duplicate_deliveries": 0}))  # asserted above: 20, each called once
    assert lost == []
    assert with_gaps["participants"] == truth["participants"]


def test_after_a_worker_process_is_killed_the_next_worker_backfills_from_its_last_sign_of_life(
    simulator: Simulator, worker_env: dict[str, str], settings: Any,
) -> None:
    settings.STREAM_LEASE_SECONDS = 1.0
    env = {**worker_env, "GENESYS_EVENT_SOURCE": "notifications", "STREAM_LEASE_SECONDS": "1",
           "GENESYS_NOTIFICATIONS_SYNC_INTERVAL": "0.05"}
    story = Story(simulator, 3)
    killed = subprocess.Popen([sys.executable, "manage.py", "stream_events"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(subscribed(simulator), what="the worker process subscribed")
        story.play(0, until="conversation:update")
        wait_for(lambda: states(*story.ids(0)), what="the live start stored")
        recorded = StreamConnection.objects.filter(source="notifications").exists
        wait_for(recorded, what="its connection recorded")
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
    row = StreamConnection.objects.get(source="notifications")
    assert row.disconnected_at is None and row.worker.endswith(f":{killed.pid}")  # it never said it ended
    story.play(0)
    story.play(1)
    story.play(2, until="conversation:end")

    with RunningWorker():
        wait_for(reached(story.ids(0, 1), "wrapped_up"), what="the downtime backfilled")
        wait_for(reached(story.ids(2), "ended"), what="the conversation in after-call work backfilled")
    assert len(calls()) == 2 + 2 + 1  # end and wrapup of two conversations, the end of the third
