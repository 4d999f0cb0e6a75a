"""A real `celery worker` process killed (SIGKILL) in the middle of a hook call: the delivery's claim expires,
the sweeper puts it back, and another worker finishes it with the same idempotency key."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from conversations import outbox, services
from conversations.models import HookDelivery

from tests.conftest import database_url
from tests.factories import lifecycle, typed
from tests.test_hooks_worker import broker_or_skip, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
STALL = "tests.test_hooks_worker_kill.stall_on_first_attempt"
MARKERS = "HOOK_TEST_MARKERS"


def stall_on_first_attempt(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    """First call: note the key, then hang (the worker is killed here). Later calls: note the key, return."""
    markers = Path(os.environ[MARKERS])
    first = markers / "attempt-1"
    if not first.exists():
        first.write_text(idempotency_key)
        time.sleep(120)
        return
    (markers / "attempt-2").write_text(idempotency_key)


@pytest.fixture
def worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen]:
    broker = broker_or_skip()
    from monitor_project.celery import app

    app.control.purge()
    monkeypatch.setenv(MARKERS, str(tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SETTINGS")}
    env.update(DJANGO_SETTINGS_MODULE="monitor_project.settings.test", DATABASE_URL=database_url(),
               CELERY_BROKER_URL=broker, CONVERSATION_HOOKS_END=STALL, CONVERSATION_HOOKS_WRAPUP="",
               PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "monitor_project", "worker", "--pool=solo", "--concurrency=1",
         "--without-heartbeat", "--without-mingle", "--without-gossip", "--loglevel=WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def test_a_worker_killed_mid_hook_is_recovered_through_the_sweeper(
    settings: Any, tmp_path: Path, worker_process: subprocess.Popen
) -> None:
    from celery.contrib.testing.worker import start_worker

    from monitor_project.celery import app

    settings.CONVERSATION_HOOKS = {"end": [STALL], "wrapup": []}
    services.ingest_batch(events=[typed(p) for p in lifecycle("conv-1")[:4]], source="sse")
    wait_for(lambda: (tmp_path / "attempt-1").exists() or worker_process.poll() is not None, timeout=60)
    assert worker_process.poll() is None, worker_process.stderr.read() if worker_process.stderr else ""
    worker_process.kill()  # SIGKILL mid-call: no outcome is written, the message is never acknowledged
    worker_process.wait(timeout=10)

    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("running", 1)
    assert outbox.sweep(grace=0).released == 0  # the claim is fresh: maybe the worker is just slow

    after_timeout = timezone.now() + timedelta(seconds=settings.HOOK_CLAIM_TIMEOUT + 1)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        assert outbox.sweep(now=after_timeout).released == 1
        wait_for(lambda: HookDelivery.objects.filter(status="succeeded").exists())

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("succeeded", 2)
    assert delivery.last_error.startswith("WorkerLost")
    keys = {(tmp_path / name).read_text() for name in ("attempt-1", "attempt-2")}
    assert keys == {delivery.idempotency_key}  # a receiver dedupes the repeated call on this key
