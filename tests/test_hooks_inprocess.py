"""Hooks without a broker in the ingest worker: the in-process runner (conversations.tasks.InProcessRunner) runs
them on its own threads, off the commit path, with the outbox's guarantees: each delivery claimed once, retries
held until due, what does not fit left pending for the sweeper, a bounded stop that leaves the rest for the next
start. The slow hook here waits on a gate the test opens, so what ran before what is counted, not timed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from conversations import outbox, services, tasks
from conversations.models import Conversation, HookDelivery

from tests.factories import lifecycle, typed, wait_for
from tests.test_outbox import CALLS, FLAKY, RECORD, calls, commit_without_enqueue
from tests.test_stream_events import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

GATED = "tests.test_hooks_inprocess.gated"
SLOW = "tests.test_hooks_inprocess.slow"

GATE = threading.Event()
STARTED: list[tuple[str, str]] = []  # (idempotency key, thread name), as each call starts
DONE: list[str] = []  # idempotency keys, as each call returns
CONNECTIONS: list[Any] = []  # the database connection of each thread a gated hook ran on
_lock = threading.Lock()


def gated(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    """Slower than any ingest: holds until the test opens the gate. Called on the thread that ingests (hooks on
    the commit path) it does not wait, so such a run fails on its counts instead of hanging."""
    thread = threading.current_thread()
    with _lock:
        STARTED.append((idempotency_key, thread.name))
        CONNECTIONS.append(connections["default"])
    if thread is not threading.main_thread():
        GATE.wait(timeout=30)
    with _lock:
        DONE.append(idempotency_key)


def slow(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    """For worker processes: 0.2 s per call, each call noted as a line in the file HOOK_CALLS_FILE names."""
    time.sleep(0.2)
    with open(os.environ["HOOK_CALLS_FILE"], "a") as calls_file:
        calls_file.write(idempotency_key + "\n")


@pytest.fixture(autouse=True)
def in_process(settings: Any) -> Iterator[None]:
    """No broker, two runner threads, a queue of four; nothing due for the sweeper until a test says so."""
    from monitor_project.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    settings.CONVERSATION_HOOKS = {"end": [GATED], "wrapup": [GATED]}
    settings.HOOK_INPROCESS_THREADS = 2
    settings.HOOK_INPROCESS_QUEUE_SIZE = 4
    settings.HOOK_INPROCESS_SHUTDOWN_GRACE = 5.0
    settings.HOOK_SWEEP_INTERVAL = 0.1
    settings.HOOK_SWEEP_GRACE = 3600.0
    GATE.clear()
    for recorded in (STARTED, DONE, CONNECTIONS, CALLS):
        recorded.clear()
    yield
    GATE.set()
    app.conf.task_always_eager = previous


def ingest(conversations: int) -> None:
    """One batch per conversation, each ending and wrapping it up: two deliveries per batch."""
    for n in range(conversations):
        services.ingest_batch(events=[typed(p) for p in lifecycle(f"conv-{n}", offset=n)], source="sse")


def statuses() -> Counter[str]:
    return Counter(HookDelivery.objects.values_list("status", flat=True))


def test_a_burst_commits_while_slow_hooks_wait_and_what_does_not_fit_stays_pending_in_the_outbox(
    settings: Any,
) -> None:
    with tasks.in_process_hooks():
        ingest(20)  # 20 commits, 40 deliveries

        # Every batch committed while not one hook had returned: none ran on the ingest path.
        assert DONE == [] and Conversation.objects.filter(state="wrapped_up").count() == 20
        wait_for(lambda: len(STARTED) == 2, what="both runner threads holding a hook")
        assert {name for _, name in STARTED} == {"hooks-1", "hooks-2"}
        assert statuses() == {"running": 2, "pending": 38}
        # Two running and four queued at most were taken; the rest were left in the outbox, not sent.
        not_sent = HookDelivery.objects.filter(enqueued_at__isnull=True).count()
        assert 40 - 6 <= not_sent <= 40 - 4

        GATE.set()
        settings.HOOK_SWEEP_GRACE = 0.0  # what was left waits for the sweeper this long (a minute by default)
        wait_for(lambda: statuses() == {"succeeded": 40}, what="every delivery sent by the sweeper")

    keys = set(HookDelivery.objects.values_list("idempotency_key", flat=True))
    assert Counter(DONE) == Counter(dict.fromkeys(keys, 1))  # each hook called exactly once
    assert set(HookDelivery.objects.values_list("attempts", flat=True)) == {1}


def test_an_id_handed_over_again_and_again_runs_once() -> None:
    GATE.set()
    with tasks.in_process_hooks() as runner:
        assert runner is not None
        ingest(2)
        ids = list(HookDelivery.objects.values_list("pk", flat=True))
        for _ in range(3):
            runner.submit(ids)
            outbox.enqueue(ids)
        wait_for(lambda: statuses() == {"succeeded": 4} and runner.queue.empty(), what="the ids worked off")
    assert sorted(Counter(DONE).values()) == [1, 1, 1, 1]


def test_a_failing_hook_is_retried_in_process_when_its_backoff_is_due(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FLAKY], "wrapup": []}
    settings.HOOK_RETRY_BASE = 0.05
    with tasks.in_process_hooks():
        ingest(1)
        wait_for(lambda: statuses() == {"succeeded": 1}, what="the third attempt")
    delivery = HookDelivery.objects.get()
    assert delivery.attempts == 3 and len(calls("flaky")) == 3


def test_without_beat_the_runner_sweeps_every_interval(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [RECORD], "wrapup": [RECORD]}
    settings.HOOK_SWEEP_GRACE = 0.0
    commit_without_enqueue(lifecycle("conv-1"))  # a worker killed between commit and send left these
    assert calls() == []
    with tasks.in_process_hooks():
        wait_for(lambda: statuses() == {"succeeded": 2}, what="the sweeper sending what was left")
    assert len(calls()) == 2 and len({key for *_, key in calls()}) == 2


def test_stop_gives_running_hooks_a_bounded_grace_and_leaves_the_rest_pending_for_the_next_start(
    settings: Any,
) -> None:
    settings.HOOK_INPROCESS_SHUTDOWN_GRACE = 0.5
    with tasks.in_process_hooks():
        ingest(10)
        wait_for(lambda: len(STARTED) == 2, what="both runner threads holding a hook")
        started = time.monotonic()
    assert time.monotonic() - started < 0.5 + 1.0  # the gate is shut: the two hooks outlive the grace
    assert statuses() == {"running": 2, "pending": 18} and DONE == []
    GATE.set()  # the two stragglers finish their attempt and record it
    wait_for(lambda: statuses() == {"succeeded": 2, "pending": 18}, what="the stragglers' outcomes")

    settings.HOOK_SWEEP_GRACE = 0.0
    with tasks.in_process_hooks():  # the next start
        wait_for(lambda: statuses() == {"succeeded": 20}, what="the rest sent by the next start's sweeper")
    keys = set(HookDelivery.objects.values_list("idempotency_key", flat=True))
    assert Counter(DONE) == Counter(dict.fromkeys(keys, 1))


def test_the_runner_threads_close_their_database_connections_when_it_stops() -> None:
    GATE.set()
    with tasks.in_process_hooks():
        ingest(3)
        wait_for(lambda: statuses() == {"succeeded": 6}, what="the hooks")
    assert CONNECTIONS and all(conn.connection is None for conn in CONNECTIONS)
    assert tasks.current_runner() is None  # later deliveries of this process go to Celery (eager) again


def test_a_broker_runs_hooks_on_celery_and_no_runner_starts() -> None:
    from monitor_project.celery import app

    app.conf.task_always_eager = False
    with tasks.in_process_hooks() as runner:
        assert runner is None and tasks.current_runner() is None


# -- a real `manage.py stream_events` process ---------------------------------------------------------


def test_sigterm_with_a_backlog_of_slow_hooks_exits_in_time_and_the_next_run_sends_the_rest_once(
    simulator: Any, worker_env: dict[str, str], tmp_path: Path,
) -> None:
    simulator.generate(conversations=60)  # 120 deliveries of 0.2 s on two threads: 12 s of hooks
    called = tmp_path / "hook-calls.txt"
    called.touch()
    env = {**worker_env, "CELERY_BROKER_URL": "", "REDIS_URL": "",  # no broker, whatever the test run's
           "CONVERSATION_HOOKS_END": SLOW, "CONVERSATION_HOOKS_WRAPUP": SLOW,
           "HOOK_CALLS_FILE": str(called), "HOOK_INPROCESS_THREADS": "2", "HOOK_INPROCESS_QUEUE_SIZE": "10",
           "HOOK_INPROCESS_SHUTDOWN_GRACE": "3", "HOOK_SWEEP_INTERVAL": "0.5", "HOOK_SWEEP_GRACE": "0"}

    log = tmp_path / "worker.log"
    with running(start_worker(env, log)) as worker:
        wait_for(lambda: Conversation.objects.filter(state="wrapped_up").count() == 60, what="the burst committed")
        wait_for(lambda: called.read_text(), what="the first hook calls")
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)  # README: grace (3 s here) + 2 s + the last commit
    assert worker.returncode == 0, log.read_text()
    assert time.monotonic() - signalled < 20
    first = called.read_text().split()
    assert statuses()["succeeded"] == len(first) == len(set(first))  # in-flight hooks finished and recorded
    assert statuses()["pending"] == 120 - len(first) > 0 and "running" not in statuses()
    assert "in-process runner stopped" in log.read_text()

    with running(start_worker(env, log)) as again:
        wait_for(lambda: statuses() == {"succeeded": 120}, what="the second run sending the rest")
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=20)
    assert again.returncode == 0, log.read_text()
    keys = HookDelivery.objects.values_list("idempotency_key", flat=True)
    assert Counter(called.read_text().split()) == Counter(dict.fromkeys(keys, 1))


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`manage.py stream_events` logging to a file: a pipe read only at the end fills up with the hooks' log
    lines and then stalls every thread that logs."""
    with log.open("a") as output:
        return subprocess.Popen([sys.executable, "manage.py", "stream_events"], cwd=ROOT, env=env,
                                stdout=output, stderr=subprocess.STDOUT)


@contextmanager
def running(worker: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """A worker process that a failing test does not leave behind."""
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
