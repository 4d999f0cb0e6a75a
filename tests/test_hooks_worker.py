"""Post-call hooks on a real Celery worker over Redis (celery.contrib.testing.worker.start_worker): the worker
runs in a thread of this process, consuming from the broker the settings name (CELERY_BROKER_URL, else
REDIS_URL). Skipped, with the reason, when no broker is configured or Redis does not answer."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from conversations import outbox, services, tasks
from conversations.models import HookDelivery

from tests.factories import lifecycle, typed
from tests.test_outbox import CALLS, FAIL, LOG, RECORD, calls, commit_without_enqueue, shuffled_batches

pytestmark = pytest.mark.django_db(transaction=True)


def broker_or_skip() -> str:
    from monitor_project.celery import app, redacted

    url = django_settings.CELERY_BROKER_URL
    if app.conf.task_always_eager:
        pytest.skip("no Celery broker configured: set REDIS_URL (e.g. redis://127.0.0.1:6379/2) to run hooks "
                    "on a real worker")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis at {redacted(url)} is unreachable ({exc}): real-worker hook tests skipped")
    return url


@pytest.fixture(scope="module")
def celery_worker() -> Iterator[Any]:
    from celery.contrib.testing.worker import start_worker

    from monitor_project.celery import app

    broker_or_skip()
    app.control.purge()  # tasks left by earlier tests that had no worker
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20) as worker:
        yield worker


@pytest.fixture(autouse=True)
def hooks_settings(settings: Any, celery_worker: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [RECORD, LOG], "wrapup": [RECORD, LOG]}
    settings.HOOK_RETRY_BASE = 0.2
    settings.HOOK_MAX_ATTEMPTS = 3
    CALLS.clear()


def wait_for(predicate: Callable[[], bool], *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            statuses = Counter(HookDelivery.objects.values_list("status", flat=True))
            raise AssertionError(f"timed out waiting; deliveries by status: {dict(statuses)}")
        time.sleep(0.05)


def all_finished(expected: int) -> Callable[[], bool]:
    def check() -> bool:
        return HookDelivery.objects.filter(status__in=["succeeded", "failed"]).count() == expected

    return check


def test_a_real_worker_delivers_once_per_conversation_and_trigger_under_duplicates_and_reordering() -> None:
    conversation_ids = [f"conv-{n}" for n in range(10)]
    payloads = [p for n, cid in enumerate(conversation_ids) for p in lifecycle(cid, offset=n)]
    for batch in shuffled_batches(payloads, seed=21) + shuffled_batches(payloads, seed=22):
        services.ingest_batch(events=[typed(p) for p in batch], source="sse")

    wait_for(all_finished(10 * 2 * 2))
    assert HookDelivery.objects.filter(status="succeeded", attempts=1).count() == 40
    per_trigger = Counter((cid, trigger) for _, cid, trigger, _ in calls())
    assert per_trigger == Counter({(cid, t): 1 for cid in conversation_ids for t in ("end", "wrapup")})


def test_on_a_real_worker_a_failing_hook_retries_with_backoff_then_fails_keeping_its_error(
    settings: Any,
) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FAIL], "wrapup": []}
    started = time.monotonic()
    services.ingest_batch(events=[typed(p) for p in lifecycle("conv-1")], source="sse")

    wait_for(all_finished(1))
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 3)
    assert delivery.last_error == "RuntimeError: CRM is down (call 3)"
    assert len(calls("fail")) == 3
    # Backoffs of 0.2 s then 0.4 s, each jittered down to no less than half.
    assert time.monotonic() - started >= 0.3


def test_work_left_by_a_killed_ingest_worker_is_delivered_by_the_sweep_task_on_a_real_worker(
    settings: Any,
) -> None:
    for n in range(5):
        commit_without_enqueue(lifecycle(f"conv-{n}", offset=n))  # committed, never sent
    time.sleep(0.3)
    assert calls() == [] and HookDelivery.objects.filter(status="pending").count() == 20

    settings.HOOK_SWEEP_GRACE = 0
    tasks.sweep_hook_deliveries.delay()  # what celery beat sends every HOOK_SWEEP_INTERVAL seconds
    wait_for(all_finished(20))
    assert HookDelivery.objects.filter(status="succeeded", attempts=1).count() == 20
    assert len(calls()) == 10 and len({key for *_, key in calls()}) == 10


def test_a_task_sent_twice_runs_the_hook_once() -> None:
    commit_without_enqueue(lifecycle("conv-1"))
    ids = list(HookDelivery.objects.filter(hook=RECORD).values_list("pk", flat=True))
    for pk in ids * 3:
        tasks.deliver_hook.delay(pk)
    wait_for(all_finished(2), timeout=30)
    assert outbox.sweep(now=timezone.now() + timedelta(hours=1)).resent == 2  # the two logging deliveries
    wait_for(all_finished(4))
    time.sleep(0.3)  # the duplicate tasks have had their turn
    assert len(calls()) == 2
