"""The hook outbox in eager mode (tasks run in the calling process, as `rerun_hooks` and the admin do without a
broker; the ingest worker's in-process runner is tests/test_hooks_inprocess.py): exactly one delivery per
conversation, trigger and hook, whatever the events do; the sweeper; retries; re-runs. Counted with recording
hooks."""
from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import OperationalError, close_old_connections, connection, transaction
from django.utils import timezone

from conversations import hooks, outbox, services
from conversations.models import HookDelivery

from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db(transaction=True)

RECORD = "tests.test_outbox.record"
FAIL = "tests.test_outbox.always_fail"
FLAKY = "tests.test_outbox.fail_twice"
LOG = "conversations.hooks.log_conversation"

# -- recording hooks, named by dotted path in the settings --------------------------------------------

CALLS: list[tuple[str, str, str, str]] = []  # (hook, conversation id, trigger, idempotency key)
SUMMARIES: list[dict[str, Any]] = []
_lock = threading.Lock()


def _note(hook: str, conversation_id: str, summary: dict[str, Any], key: str) -> int:
    with _lock:
        CALLS.append((hook, conversation_id, summary["trigger"], key))
        SUMMARIES.append(summary)
        return sum(1 for call in CALLS if call[0] == hook and call[3] == key)


def record(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    _note("record", conversation_id, summary, idempotency_key)


def always_fail(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    attempt = _note("fail", conversation_id, summary, idempotency_key)
    raise RuntimeError(f"CRM is down (call {attempt})")


def fail_twice(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    if _note("flaky", conversation_id, summary, idempotency_key) <= 2:
        raise ConnectionError("survey service reset the connection")


def calls(hook: str = "record") -> list[tuple[str, str, str, str]]:
    return [call for call in CALLS if call[0] == hook]


@pytest.fixture(autouse=True)
def eager_hooks(settings: Any) -> Iterator[None]:
    """In-process tasks whatever the environment's broker, and a clean record of hook calls."""
    from monitor_project.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    settings.CONVERSATION_HOOKS = {"end": [RECORD, LOG], "wrapup": [RECORD, LOG]}
    settings.HOOK_RETRY_BASE = 0.0  # eager retries run at once, chained in-process
    settings.HOOK_MAX_ATTEMPTS = 4
    CALLS.clear()
    SUMMARIES.clear()
    yield
    app.conf.task_always_eager = previous


def ingest(payloads: list[dict[str, Any]]) -> services.BatchResult:
    return services.ingest_batch(events=[typed(p) for p in payloads], source="sse")


def shuffled_batches(payloads: list[dict[str, Any]], *, seed: int) -> list[list[dict[str, Any]]]:
    """Every event, plus duplicates of the ends and wrap-ups, in a random order and random batch sizes."""
    rng = random.Random(seed)
    wire = payloads + [p for p in payloads if p["eventType"] in ("conversation:end", "conversation:wrapup")]
    rng.shuffle(wire)
    batches = []
    while wire:
        size = rng.randint(1, 7)
        batches.append(wire[:size])
        wire = wire[size:]
    return batches


# -- one delivery per conversation, trigger and hook ----------------------------------------------------


def test_duplicate_and_reordered_events_give_one_delivery_per_conversation_and_trigger() -> None:
    conversation_ids = [f"conv-{n}" for n in range(20)]
    payloads = [p for n, cid in enumerate(conversation_ids) for p in lifecycle(cid, offset=n)]
    for batch in shuffled_batches(payloads, seed=11):
        ingest(batch)
    for batch in shuffled_batches(payloads, seed=12):  # the whole stream again, replayed in another order
        ingest(batch)

    assert HookDelivery.objects.count() == 20 * 2 * 2  # conversations x triggers x hooks
    assert HookDelivery.objects.filter(status="succeeded", attempts=1).count() == 80
    per_trigger = Counter((cid, trigger) for _, cid, trigger, _ in calls())
    assert set(per_trigger) == {(cid, t) for cid in conversation_ids for t in ("end", "wrapup")}
    assert set(per_trigger.values()) == {1}


def test_a_conversation_that_jumps_to_wrapped_up_gets_both_end_and_wrapup() -> None:
    events = lifecycle("conv-1")
    first = ingest([events[4]])  # the wrap-up arrives first
    later = ingest(events[:4])
    assert [(t.old_state, t.new_state) for t in first.transitions] == [("", "wrapped_up")]
    assert sorted((d.trigger, d.hook) for d in first.deliveries) == [
        ("end", LOG), ("end", RECORD), ("wrapup", LOG), ("wrapup", RECORD)]
    assert later.deliveries == []
    assert sorted(trigger for _, _, trigger, _ in calls()) == ["end", "wrapup"]


def test_duplicate_batches_ingested_at_once_by_two_workers_deliver_once() -> None:
    payloads = [p for n in range(10) for p in lifecycle(f"conv-{n}", offset=n)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            ingest(payloads)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert HookDelivery.objects.count() == 10 * 2 * 2
    assert len(calls()) == 20 and len({key for *_, key in calls()}) == 20


def test_the_idempotency_key_is_stable_for_conversation_trigger_and_hook() -> None:
    ingest(lifecycle("conv-1"))
    delivery = HookDelivery.objects.get(trigger="end", hook=RECORD)
    assert delivery.idempotency_key == outbox.idempotency_key("conv-1", "end", RECORD)
    assert len(delivery.idempotency_key) == 64
    assert [key for *_, trigger, key in calls() if trigger == "end"] == [delivery.idempotency_key]
    assert outbox.idempotency_key("conv-1", "wrapup", RECORD) != delivery.idempotency_key


def test_hooks_receive_the_conversation_summary() -> None:
    ingest(lifecycle("conv-1"))
    summary = next(s for s in SUMMARIES if s["trigger"] == "wrapup")
    assert summary["conversation_id"] == "conv-1" and summary["state"] == "wrapped_up"
    assert (summary["media_type"], summary["direction"]) == ("voice", "inbound")
    assert (summary["ani"], summary["dnis"]) == ("tel:+35315550123", "tel:+35318880000")
    assert summary["queue"] == {"id": "queue-billing", "name": "Billing"}
    assert [a["name"] for a in summary["agents"]] == ["José Müller", "李雷"]
    assert summary["agents"][0]["talk_seconds"] == 15.0
    assert summary["wrapup"] == {"code": "code-resolved", "name": "Resolved", "notes": "Kundin zufrieden ✓"}
    assert summary["times"]["started_at"] == "2026-11-28T09:00:00+00:00"
    durations = {"conversation_seconds": 60.0, "wrapup_seconds": 30.0, "agent_seconds": 55.0}
    assert summary["durations"] == durations


# -- the sweeper ----------------------------------------------------------------------------------------


def commit_without_enqueue(payloads: list[dict[str, Any]]) -> services.BatchResult:
    """What a worker killed between commit and enqueue leaves behind: committed deliveries, nothing sent."""
    with transaction.atomic():
        return services.write_batch(events=[typed(p) for p in payloads], rejects=[], source="sse",
                                    last_event_id=None)


def test_a_worker_killed_after_commit_before_enqueue_still_delivers_through_the_sweeper() -> None:
    for n in range(5):
        commit_without_enqueue(lifecycle(f"conv-{n}", offset=n))
    assert HookDelivery.objects.filter(status="pending", enqueued_at__isnull=True).count() == 20
    assert calls() == []

    assert outbox.sweep(grace=60).resent == 0  # younger than the grace period: their task may still come
    result = outbox.sweep(now=timezone.now() + timedelta(seconds=61))
    assert result.resent == 20
    assert HookDelivery.objects.filter(status="succeeded").count() == 20
    assert len(calls()) == 10 and len({key for *_, key in calls()}) == 10
    assert outbox.sweep(now=timezone.now() + timedelta(hours=1)).resent == 0


def test_a_database_failing_right_after_the_commit_loses_no_delivery_and_runs_none_twice() -> None:
    # The batch commits, its ids reach the broker (eager here: the hooks run), then stamping them as sent fails.
    def fail_the_stamp(execute, sql, params, many, context):  # noqa: ANN001, ANN202
        if "enqueued_at" in sql and sql.lstrip().upper().startswith("UPDATE"):
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(fail_the_stamp):
        result = ingest(lifecycle("conv-1"))  # does not raise: the batch is committed
    assert len(result.deliveries) == 4
    assert HookDelivery.objects.filter(status="succeeded").count() == 4
    assert outbox.sweep(now=timezone.now() + timedelta(seconds=61)).resent == 0  # ran already: not re-sent
    assert len(calls()) == 2  # end and wrap-up of the logging hook... each once


def test_a_broker_that_is_down_leaves_deliveries_pending_until_the_sweeper(settings: Any) -> None:
    from monitor_project.celery import app

    app.conf.task_always_eager = False
    with dead_broker(app):
        result = ingest(lifecycle("conv-1"))
    assert len(result.deliveries) == 4
    assert HookDelivery.objects.filter(status="pending", enqueued_at__isnull=True).count() == 4
    app.conf.task_always_eager = True
    assert outbox.sweep(grace=0).resent == 4
    assert len(calls()) == 2 and HookDelivery.objects.filter(status="succeeded").count() == 4


class dead_broker:  # noqa: N801 (used as a context manager)
    """Point the Celery app at a closed port for the block, with its connection pools reset around it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __enter__(self) -> None:
        self.saved = (self.app.conf.broker_url, self.app.conf.broker_connection_retry,
                      self.app.conf.broker_transport_options)
        self.app.conf.broker_url = "redis://127.0.0.1:9/0"  # the discard port: connection refused
        self.app.conf.broker_transport_options = {"max_retries": 1}
        self._reset_pools()

    def __exit__(self, *exc: object) -> None:
        self.app.conf.broker_url, self.app.conf.broker_connection_retry, options = self.saved
        self.app.conf.broker_transport_options = options
        self._reset_pools()

    def _reset_pools(self) -> None:
        self.app._pool = None
        self.app.amqp._producer_pool = None


def test_two_sweepers_at_once_send_each_delivery_once() -> None:
    for n in range(10):
        commit_without_enqueue(lifecycle(f"conv-{n}", offset=n))
    later = timezone.now() + timedelta(minutes=5)
    barrier = threading.Barrier(2)
    resent: list[int] = []

    def sweeper() -> None:
        barrier.wait()
        try:
            resent.append(outbox.sweep(now=later).resent)
        finally:
            connection.close()

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(resent) == 40
    assert len(calls()) == 20
    assert HookDelivery.objects.filter(status="succeeded", attempts=1).count() == 40


def test_a_fresh_claim_is_skipped_and_an_expired_one_is_released_by_the_sweeper(settings: Any) -> None:
    commit_without_enqueue(lifecycle("conv-1"))
    delivery = HookDelivery.objects.get(trigger="end", hook=RECORD)
    claimed_now = {"status": "running", "started_at": timezone.now(), "attempts": 1}
    HookDelivery.objects.filter(pk=delivery.pk).update(**claimed_now)
    assert outbox.run_delivery(delivery.pk) == "skipped"  # another worker holds it right now
    assert calls() == []

    later = timezone.now() + timedelta(seconds=settings.HOOK_CLAIM_TIMEOUT + 1)
    result = outbox.sweep(now=later, grace=0)
    assert result.released == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("succeeded", 2)
    assert delivery.last_error.startswith("WorkerLost")
    assert len(calls()) == 2  # this delivery once, the wrap-up once


def test_an_expired_claim_on_the_last_attempt_fails_the_delivery(settings: Any) -> None:
    commit_without_enqueue(lifecycle("conv-1"))
    last = settings.HOOK_MAX_ATTEMPTS
    HookDelivery.objects.update(status="running", started_at=timezone.now(), attempts=last)
    later = timezone.now() + timedelta(seconds=settings.HOOK_CLAIM_TIMEOUT + 1)
    assert outbox.sweep(now=later, grace=0).abandoned_failed == 4
    assert HookDelivery.objects.filter(status="failed", last_error__startswith="WorkerLost").count() == 4
    assert calls() == []


# -- retries and failures -------------------------------------------------------------------------------


def test_a_failing_hook_retries_then_fails_with_its_error_kept(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FAIL], "wrapup": []}
    ingest(lifecycle("conv-1"))
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 4)
    assert delivery.last_error == "RuntimeError: CRM is down (call 4)"
    assert delivery.finished_at is not None and delivery.last_duration_ms is not None
    assert len(calls("fail")) == 4
    outbox.run_delivery(delivery.pk)  # a late duplicate task: a failed delivery never runs again
    assert len(calls("fail")) == 4


def test_a_hook_that_fails_twice_succeeds_on_the_third_attempt(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FLAKY], "wrapup": []}
    ingest(lifecycle("conv-1"))
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("succeeded", 3)
    assert delivery.last_error == "ConnectionError: survey service reset the connection"
    assert len(calls("flaky")) == 3


def test_a_retry_waits_for_its_backoff_and_the_sweeper_runs_it_when_due(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FLAKY], "wrapup": []}
    settings.HOOK_RETRY_BASE = 30.0
    before = timezone.now()
    ingest(lifecycle("conv-1"))
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert before + timedelta(seconds=15) <= delivery.next_attempt_at  # 30 s x [0.5, 1]
    assert delivery.next_attempt_at <= timezone.now() + timedelta(seconds=30)
    assert outbox.run_delivery(delivery.pk) == "skipped"  # an early task waits for the backoff
    assert outbox.sweep(grace=0).resent == 0
    outbox.sweep(now=delivery.next_attempt_at + timedelta(seconds=1), grace=0)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("pending", 2)
    assert delivery.next_attempt_at - delivery.enqueued_at >= timedelta(seconds=30)  # 60 s x [0.5, 1]


def test_the_retry_delay_doubles_per_attempt_up_to_the_cap(settings: Any) -> None:
    settings.HOOK_RETRY_BASE, settings.HOOK_RETRY_MAX = 10.0, 100.0
    for attempt, full in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (9, 100)]:
        delays = [outbox.retry_delay(attempt) for _ in range(50)]
        assert all(full / 2 <= delay <= full for delay in delays), (attempt, min(delays), max(delays))


def test_a_permanent_hook_error_fails_at_once(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": ["tests.test_outbox.reject_permanently"], "wrapup": []}
    ingest(lifecycle("conv-1"))
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.last_error == "PermanentHookError: the CRM has no such customer"


def reject_permanently(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    raise hooks.PermanentHookError("the CRM has no such customer")


# -- configuration --------------------------------------------------------------------------------------


def test_a_bad_dotted_path_is_a_configuration_error_naming_the_variable(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [RECORD], "wrapup": ["crm.sync.nope"]}
    expected = r"^CONVERSATION_HOOKS_WRAPUP: cannot load the hook 'crm.sync.nope'"
    with pytest.raises(ImproperlyConfigured, match=expected):
        hooks.validate_configuration()
    [error] = hooks.hooks_configuration_check()
    assert error.id == "conversations.E101" and "CONVERSATION_HOOKS_WRAPUP" in error.msg


def test_without_a_broker_tasks_run_in_process_and_the_log_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from monitor_project.celery import describe_mode

    assert describe_mode().startswith("no broker configured")
    outbox._announced = False
    with caplog.at_level("INFO", logger="conversations.outbox"):
        ingest(lifecycle("conv-1"))
        ingest(lifecycle("conv-2"))
    announcements = [r.getMessage() for r in caplog.records if "task_always_eager" in r.getMessage()]
    assert len(announcements) == 1


# -- re-running -----------------------------------------------------------------------------------------


def test_rerun_deliveries_resets_to_pending_keeps_attempts_and_runs_again(settings: Any) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FAIL], "wrapup": [RECORD]}
    ingest(lifecycle("conv-1"))
    failed = HookDelivery.objects.filter(status="failed")
    assert failed.count() == 1 and len(calls("fail")) == 4

    settings.CONVERSATION_HOOKS = {"end": [FAIL], "wrapup": [RECORD]}
    assert outbox.rerun_deliveries(failed) == 1
    delivery = HookDelivery.objects.get(hook=FAIL)
    assert (delivery.status, delivery.attempts) == ("failed", 5)  # one more attempt, then failed again
    assert len(calls("fail")) == 5

    wrapup = HookDelivery.objects.get(hook=RECORD)
    assert outbox.rerun_deliveries([wrapup]) == 1  # a succeeded one runs again when asked
    assert len(calls("record")) == 2


def test_rerun_leaves_a_running_delivery_alone() -> None:
    commit_without_enqueue(lifecycle("conv-1"))
    HookDelivery.objects.update(status="running", started_at=timezone.now(), attempts=1)
    assert outbox.rerun_deliveries(HookDelivery.objects.all()) == 0
    assert calls() == []


def test_the_rerun_hooks_command_selects_by_conversation_trigger_hook_and_failure_time(
    settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings.CONVERSATION_HOOKS = {"end": [FAIL, RECORD], "wrapup": [FAIL, RECORD]}
    ingest(lifecycle("conv-1"))
    ingest(lifecycle("conv-2", offset=5))
    assert HookDelivery.objects.filter(status="failed").count() == 4
    CALLS.clear()

    call_command("rerun_hooks", conversation="conv-1", trigger="end", hook=RECORD)
    assert capsys.readouterr().out.strip() == "1 hook deliveries matched, 1 re-run, 0 skipped (running)"
    assert [(cid, trigger) for _, cid, trigger, _ in calls("record")] == [("conv-1", "end")]

    soon = (timezone.now() + timedelta(minutes=1)).isoformat()
    call_command("rerun_hooks", failed_since=soon, dry_run=True)
    assert capsys.readouterr().out.startswith("0 hook deliveries match")
    call_command("rerun_hooks", "--failed-since", "2026-01-01T00:00:00Z", "--trigger", "wrapup")
    assert capsys.readouterr().out.startswith("2 hook deliveries matched, 2 re-run")
    assert sorted(cid for _, cid, _, _ in calls("fail")) == ["conv-1", "conv-2"]
