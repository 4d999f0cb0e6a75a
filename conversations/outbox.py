"""The transactional outbox of post-call hooks.

The batch transaction that moves a conversation to ended or wrapped_up also writes one HookDelivery per
configured hook (unique on conversation, trigger and hook, so duplicates and reordered events write nothing
twice). After commit each new delivery's id is sent to Celery, or, with no broker, to the ingest worker's
in-process runner (tasks.InProcessRunner), never run in the committing thread. A periodic sweeper re-sends
deliveries left pending (a worker killed between commit and send, a broker that was down, a full in-process
queue) and releases abandoned claims.

A delivery only moves pending -> running -> succeeded | failed (or back to pending for a retry), and every
move is a conditional UPDATE, so a task that arrives twice, or two sweepers, never run a hook twice at once.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connection, transaction
from django.db.models import DateTimeField, F, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from conversations import bulk, hooks
from conversations.events import STATE_RANK, ConversationState
from conversations.models import Conversation, HookDelivery

if TYPE_CHECKING:
    from conversations.services import BatchResult, Transition

logger = logging.getLogger(__name__)

Status = HookDelivery.Status
# Which trigger fires when a conversation reaches (or jumps past) which state.
TRIGGER_STATES = (("end", ConversationState.ENDED), ("wrapup", ConversationState.WRAPPED_UP))
MAX_ERROR_CHARS = 2000
ENQUEUE_CHUNK = 1000  # delivery ids per deliver_hooks message
LOST_ERROR = "WorkerLost: the worker running the last attempt died (its claim expired)"


# -- writing deliveries (inside the batch transaction) ------------------------------------------------


def idempotency_key(conversation_id: str, trigger: str, hook: str) -> str:
    """Stable for (conversation, trigger, hook): every attempt and re-run of a delivery sends the same key."""
    return hashlib.sha256(f"{conversation_id}\x1f{trigger}\x1f{hook}".encode()).hexdigest()


def triggers_for(old_state: str, new_state: str) -> list[str]:
    """A jump from "" or active straight to wrapped_up (reordered events) fires both end and wrapup."""
    old, new = STATE_RANK.get(old_state, 0), STATE_RANK.get(new_state, 0)
    return [trigger for trigger, state in TRIGGER_STATES if old < STATE_RANK[state] <= new]


def create_deliveries(
    *, conversations: dict[str, Conversation], transitions: Sequence[Transition]
) -> list[HookDelivery]:
    """Write the deliveries these transitions call for; returns only the rows this call created.

    One INSERT ... ON CONFLICT DO NOTHING RETURNING: the database says which rows are new, so a delivery that
    another batch (or another worker) already wrote is neither written nor returned twice.
    """
    configured = {trigger: hooks.hooks_for(trigger) for trigger, _ in TRIGGER_STATES}
    # In the transitions' order (by conversation id), then end before wrap-up: ids, and so deliveries, follow it.
    wanted = [
        (idempotency_key(t.conversation_id, trigger, hook), t.conversation_id, trigger, hook)
        for t in transitions
        for trigger in triggers_for(t.old_state, t.new_state)
        for hook in configured[trigger]
    ]
    if not wanted:
        return []
    now = timezone.now()
    inserted = bulk.insert_ignore(
        table=HookDelivery._meta.db_table, columns=DELIVERY_COLUMNS,
        rows=[(conversations[cid].pk, trigger, hook, Status.PENDING.value, key, 0, now, "")
              for key, cid, trigger, hook in wanted],
        conflict=["idempotency_key"], returning=["id", "idempotency_key"],
    )
    ids = {key: pk for pk, key in inserted}
    created = [new_delivery(ids[key], conversations[cid], trigger, hook, key, now)
               for key, cid, trigger, hook in wanted if key in ids]
    created.sort(key=lambda delivery: delivery.pk)
    logger.info("outbox: %d hook deliveries written for %d transitions (%d already existed)",
                len(created), len(transitions), len(wanted) - len(created))
    return created


DELIVERY_COLUMNS = ("conversation_id", "trigger", "hook", "status", "idempotency_key", "attempts", "created_at",
                    "last_error")
# Every column of a new delivery, in the order Model.from_db expects: the rows just written, without a read.
NEW_DELIVERY = {"status": Status.PENDING.value, "attempts": 0, "enqueued_at": None, "started_at": None,
                "finished_at": None, "next_attempt_at": None, "last_duration_ms": None, "last_error": ""}
DELIVERY_FIELDS = tuple(f.attname for f in HookDelivery._meta.concrete_fields)


def new_delivery(pk: int, conversation: Conversation, trigger: str, hook: str, key: str,
                 created_at: datetime) -> HookDelivery:
    values = {**NEW_DELIVERY, "id": pk, "conversation_id": conversation.pk, "trigger": trigger, "hook": hook,
              "idempotency_key": key, "created_at": created_at}
    delivery = HookDelivery.from_db(connection.alias, DELIVERY_FIELDS, [values[name] for name in DELIVERY_FIELDS])
    delivery.conversation = conversation  # already at hand: reading it would cost a query per delivery
    return delivery


# -- sending ids to Celery or the in-process runner (after commit) -------------------------------------


def enqueue_after_commit(deliveries: Iterable[HookDelivery]) -> None:
    """Send the deliveries' ids to Celery once the current transaction commits (at once outside one)."""
    ids = [delivery.pk for delivery in deliveries]
    if ids:
        transaction.on_commit(partial(enqueue, ids))


def enqueue(delivery_ids: Sequence[int]) -> int:
    """Send the ids to what runs this process's hooks, without waiting for a hook, and stamp those sent.

    With a broker, Celery gets one `deliver_hooks` message per ENQUEUE_CHUNK ids (the Celery worker fans it
    out into one `deliver_hook` task per id): the process that committed pays one broker round trip per batch,
    not one per delivery. Without one, the ingest worker's in-process runner (tasks.InProcessRunner) queues
    them for its threads. A broker that is down, or a runner whose queue is full, leaves the rest pending: the
    sweeper sends them."""
    from conversations.tasks import current_runner  # tasks import this module

    if not delivery_ids:
        return 0
    announce_mode()
    runner = current_runner()
    sent = runner.submit(delivery_ids) if runner is not None else send_to_celery(delivery_ids)
    if sent:
        try:
            mark_sent(sent)
        except DatabaseError as exc:  # the batch is committed; an unstamped delivery is only sent again
            logger.warning("outbox: %d hook deliveries sent but not stamped as sent (%s); the sweeper will send "
                           "them again and each still runs once", len(sent), str(exc).strip().splitlines()[0])
    return len(sent)


def send_to_celery(delivery_ids: Sequence[int]) -> list[int]:
    """The ids sent, in one message per ENQUEUE_CHUNK; a broker that is down is logged, not raised."""
    from conversations.tasks import deliver_hooks

    sent: list[int] = []
    for start in range(0, len(delivery_ids), ENQUEUE_CHUNK):
        chunk = list(delivery_ids[start:start + ENQUEUE_CHUNK])
        try:
            deliver_hooks.apply_async((chunk,))
        except (BrokerError, OSError) as exc:
            logger.warning("outbox: broker unreachable, %d of %d hook deliveries not sent (%s); the sweeper "
                           "will re-send them", len(delivery_ids) - len(sent), len(delivery_ids), exc)
            break
        sent.extend(chunk)
    return sent


def mark_sent(delivery_ids: Sequence[int]) -> None:
    """Stamp deliveries as sent. On its own (after the batch's commit) this need not wait for a disk flush: a
    stamp lost in a crash only makes the sweeper send a delivery again, and the claim runs it once."""
    own_transaction = not connection.in_atomic_block  # never relax an enclosing transaction's durability
    with transaction.atomic():
        if own_transaction and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        HookDelivery.objects.filter(pk__in=delivery_ids, enqueued_at__isnull=True).update(enqueued_at=timezone.now())


def fan_out(delivery_ids: Sequence[int]) -> int:
    """Run by the `deliver_hooks` task on a Celery worker: one `deliver_hook` task per id, so each delivery
    keeps its own claim, time limit and retries. A broker failure here is left to the sweeper, like above."""
    from conversations.tasks import deliver_hook

    for count, pk in enumerate(delivery_ids):
        try:
            deliver_hook.apply_async((pk,))
        except (BrokerError, OSError) as exc:
            logger.warning("outbox: broker unreachable while fanning out, %d of %d hook deliveries not sent (%s); "
                           "the sweeper will re-send them", len(delivery_ids) - count, len(delivery_ids), exc)
            return count
    return len(delivery_ids)


_announced = False


def announce_mode() -> None:
    """Say once per process where hooks run: in-process (no broker configured) or on Celery workers."""
    global _announced
    if _announced:
        return
    _announced = True
    from monitor_project.celery import describe_mode

    logger.info("post-call hooks: %s", describe_mode())


# -- re-running ----------------------------------------------------------------------------------------


def rerun_deliveries(deliveries: QuerySet[HookDelivery] | Iterable[HookDelivery]) -> int:
    """Reset deliveries to pending (attempts kept) and send them after commit; a running one is left alone.

    Returns how many were reset.
    """
    if isinstance(deliveries, QuerySet):
        ids = list(deliveries.values_list("pk", flat=True))
    else:
        ids = [delivery.pk for delivery in deliveries]
    with transaction.atomic():
        reset = list(
            HookDelivery.objects.select_for_update().filter(pk__in=ids).exclude(status=Status.RUNNING)
            .values_list("pk", flat=True)
        )
        HookDelivery.objects.filter(pk__in=reset).update(
            status=Status.PENDING, next_attempt_at=None, finished_at=None, enqueued_at=None
        )
        transaction.on_commit(partial(enqueue, reset))
    logger.info("outbox: %d hook deliveries reset to pending for a re-run (%d asked, running ones skipped)",
                len(reset), len(ids))
    return len(reset)


# -- the sweeper ---------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    resent: int = 0
    released: int = 0  # abandoned claims (the worker died mid-attempt) put back to pending
    abandoned_failed: int = 0  # abandoned claims with no attempts left


def sweep(
    *, now: datetime | None = None, grace: float | None = None, limit: int | None = None
) -> SweepResult:
    """Re-send deliveries pending past the grace period or their retry time; release dead claims."""
    announce_mode()
    now = now or timezone.now()
    grace_period = timedelta(seconds=settings.HOOK_SWEEP_GRACE if grace is None else grace)
    result = SweepResult()
    result.abandoned_failed, result.released = release_abandoned(now=now)
    with transaction.atomic():
        ids = claim_due(now=now, grace=grace_period, limit=limit or settings.HOOK_SWEEP_BATCH)
        transaction.on_commit(partial(enqueue, ids))
    result.resent = len(ids)
    if ids or result.released or result.abandoned_failed:
        logger.info("sweeper: %d hook deliveries re-sent, %d abandoned claims released, %d failed after "
                    "the last attempt was lost", result.resent, result.released, result.abandoned_failed)
    return result


def due(*, now: datetime, grace: timedelta) -> QuerySet[HookDelivery]:
    """Pending for longer than the grace period since it was created, sent, or due for its retry."""
    waiting_since = Coalesce("next_attempt_at", "enqueued_at", "created_at", output_field=DateTimeField())
    return HookDelivery.objects.alias(waiting_since=waiting_since).filter(
        status=Status.PENDING, waiting_since__lte=now - grace
    )


def claim_due(*, now: datetime, grace: timedelta, limit: int) -> list[int]:
    """Claim due rows by stamping them as sent now: a second sweeper skips them (locked, then not due)."""
    candidates = due(now=now, grace=grace).order_by("pk")
    if connection.features.has_select_for_update_skip_locked:
        ids = list(candidates.select_for_update(skip_locked=True).values_list("pk", flat=True)[:limit])
        HookDelivery.objects.filter(pk__in=ids).update(enqueued_at=now, next_attempt_at=None)
        return ids
    # SQLite has no SKIP LOCKED: claim each row with a conditional UPDATE instead; only one sweeper wins it.
    ids = list(candidates.values_list("pk", flat=True)[:limit])
    return [
        pk for pk in ids
        if due(now=now, grace=grace).filter(pk=pk).update(enqueued_at=now, next_attempt_at=None)
    ]


def release_abandoned(*, now: datetime) -> tuple[int, int]:
    """A claim older than HOOK_CLAIM_TIMEOUT belongs to a dead worker: retry it, or fail it if out of tries."""
    stale = HookDelivery.objects.filter(
        status=Status.RUNNING, started_at__lte=now - timedelta(seconds=settings.HOOK_CLAIM_TIMEOUT)
    )
    failed = stale.filter(attempts__gte=settings.HOOK_MAX_ATTEMPTS).update(
        status=Status.FAILED, finished_at=now, last_error=LOST_ERROR
    )
    released = stale.filter(attempts__lt=settings.HOOK_MAX_ATTEMPTS).update(
        status=Status.PENDING, next_attempt_at=None, enqueued_at=None, last_error=LOST_ERROR
    )
    return failed, released


# -- running one delivery (a Celery task or an in-process runner thread) -------------------------------


@dataclass(frozen=True)
class Outcome:
    error: str = ""
    permanent: bool = False
    duration_ms: int = 0

    @property
    def ok(self) -> bool:
        return not self.error


def run_delivery(delivery_id: int) -> str:
    """Claim, call the hook, record the outcome. Returns what happened, for the task's log line."""
    delivery = claim(delivery_id, now=timezone.now())
    if delivery is None:
        return "skipped"
    outcome = call_hook(delivery)
    return record(delivery, outcome)


def claimable(*, now: datetime) -> Q:
    """Pending and due, or running under a claim so old that its worker must be dead (attempts left)."""
    due_now = Q(status=Status.PENDING) & (Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
    abandoned = Q(
        status=Status.RUNNING,
        started_at__lte=now - timedelta(seconds=settings.HOOK_CLAIM_TIMEOUT),
        attempts__lt=settings.HOOK_MAX_ATTEMPTS,
    )
    return due_now | abandoned


def claim(delivery_id: int, *, now: datetime) -> HookDelivery | None:
    """The conditional UPDATE that makes a task idempotent: only one task ever holds a given attempt."""
    won = HookDelivery.objects.filter(claimable(now=now), pk=delivery_id).update(
        status=Status.RUNNING, started_at=now, finished_at=None, attempts=F("attempts") + 1
    )
    if not won:
        explain_skip(delivery_id, now=now)
        return None
    return HookDelivery.objects.select_related("conversation").get(pk=delivery_id)


def explain_skip(delivery_id: int, *, now: datetime) -> None:
    delivery = HookDelivery.objects.filter(pk=delivery_id).first()
    if delivery is None:
        logger.warning("hook delivery %s: not found (deleted with its conversation?), nothing to do",
                       delivery_id)
    elif delivery.status == Status.PENDING:
        logger.info("hook delivery %s: not due before %s, left for its retry", delivery_id,
                    delivery.next_attempt_at)
    else:
        logger.info("hook delivery %s: already %s (attempt %s), not run again", delivery_id, delivery.status,
                    delivery.attempts)


def call_hook(delivery: HookDelivery) -> Outcome:
    started = time.monotonic()
    try:
        hook = hooks.resolve(delivery.hook, trigger=delivery.trigger)
        summary = build_summary(delivery.conversation, trigger=delivery.trigger)
        hook(delivery.conversation.conversation_id, summary, delivery.idempotency_key)
    except (hooks.PermanentHookError, ImproperlyConfigured) as exc:
        return Outcome(_describe(exc), permanent=True, duration_ms=_ms_since(started))
    except Exception as exc:  # a plain callable may raise anything: a transient failure, retried then kept
        return Outcome(_describe(exc), duration_ms=_ms_since(started))
    return Outcome(duration_ms=_ms_since(started))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def record(delivery: HookDelivery, outcome: Outcome) -> str:
    """Write the outcome, only if this task still holds the claim (the attempt number is the claim token)."""
    now = timezone.now()
    ours = held(delivery)
    context = (delivery.pk, delivery.hook, delivery.trigger, delivery.conversation.conversation_id,
               delivery.attempts, settings.HOOK_MAX_ATTEMPTS)
    if outcome.ok:
        changed = ours.update(status=Status.SUCCEEDED, finished_at=now, last_duration_ms=outcome.duration_ms)
        logger.info("hook delivery %s: %s on %s of conversation %s succeeded (attempt %s of %s)", *context)
        return _unless_lost(changed, delivery, "succeeded")
    if outcome.permanent or delivery.attempts >= settings.HOOK_MAX_ATTEMPTS:
        changed = ours.update(status=Status.FAILED, finished_at=now, last_duration_ms=outcome.duration_ms,
                              last_error=outcome.error)
        logger.error("hook delivery %s: %s on %s of conversation %s failed for good (attempt %s of %s): %s",
                     *context, outcome.error)
        return _unless_lost(changed, delivery, "failed")
    return schedule_retry(delivery, outcome, now=now, context=context)


def held(delivery: HookDelivery) -> QuerySet[HookDelivery]:
    """The delivery, as long as this task's claim on it stands."""
    return HookDelivery.objects.filter(pk=delivery.pk, status=Status.RUNNING, attempts=delivery.attempts)


def schedule_retry(delivery: HookDelivery, outcome: Outcome, *, now: datetime, context: tuple) -> str:
    at = now + timedelta(seconds=retry_delay(delivery.attempts))
    changed = held(delivery).update(
        status=Status.PENDING, next_attempt_at=at, enqueued_at=now, last_duration_ms=outcome.duration_ms,
        last_error=outcome.error,
    )
    logger.warning("hook delivery %s: %s on %s of conversation %s failed (attempt %s of %s), retry at %s: %s",
                   *context, at.isoformat(), outcome.error)
    if changed:
        send_retry(delivery.pk, at=at)
    return _unless_lost(changed, delivery, "retrying")


def send_retry(delivery_id: int, *, at: datetime) -> None:
    """The in-process runner holds the retry until it is due, Celery gets a task with an eta; one that cannot
    be sent stays pending and the sweeper sends it once due."""
    from conversations.tasks import current_runner, deliver_hook

    runner = current_runner()
    if runner is not None:
        runner.retry_at(delivery_id, at=at)
        return
    try:
        deliver_hook.apply_async((delivery_id,), eta=at)
    except (BrokerError, OSError) as exc:
        logger.warning("hook delivery %s: broker unreachable for the retry (%s); the sweeper sends it",
                       delivery_id, exc)


def _unless_lost(changed: int, delivery: HookDelivery, outcome: str) -> str:
    if changed:
        return outcome
    logger.warning("hook delivery %s: the claim on attempt %s expired and was taken over; outcome %r dropped",
                   delivery.pk, delivery.attempts, outcome)
    return "claim lost"


def retry_delay(attempt: int) -> float:
    """Exponential backoff after the given attempt, capped, with jitter so retries of a burst spread out."""
    delay = min(settings.HOOK_RETRY_MAX, settings.HOOK_RETRY_BASE * 2 ** max(attempt - 1, 0))
    return delay * random.uniform(0.5, 1.0)


# -- the summary handed to hooks -----------------------------------------------------------------------


def build_summary(conversation: Conversation, *, trigger: str) -> dict[str, Any]:
    """What a hook knows about the conversation, as JSON-ready values (read when the delivery runs)."""
    c = conversation
    agent_rows = c.participants.filter(purpose="agent").order_by(F("connected_at").asc(nulls_last=True), "pk")
    agents = [agent_summary(p) for p in agent_rows]
    return {
        "conversation_id": c.conversation_id,
        "trigger": trigger,
        "state": c.state,
        "media_type": c.media_type,
        "direction": c.direction,
        "ani": c.ani,
        "dnis": c.dnis,
        "queue": {"id": c.queue_id, "name": c.queue_name},
        "agents": agents,
        "wrapup": {"code": c.wrapup_code, "name": c.wrapup_name, "notes": c.wrapup_notes},
        "times": {"started_at": _iso(c.started_at), "ended_at": _iso(c.ended_at),
                  "wrapped_up_at": _iso(c.wrapped_up_at), "last_event_at": _iso(c.last_event_at)},
        "durations": {"conversation_seconds": _seconds(c.started_at, c.ended_at),
                      "wrapup_seconds": _seconds(c.ended_at, c.wrapped_up_at),
                      "agent_seconds": sum(a["talk_seconds"] or 0 for a in agents)},
    }


def agent_summary(participant: Any) -> dict[str, Any]:
    return {
        "user_id": participant.user_id,
        "name": participant.name,
        "queue_id": participant.queue_id,
        "connected_at": _iso(participant.connected_at),
        "ended_at": _iso(participant.ended_at),
        "talk_seconds": _seconds(participant.connected_at, participant.ended_at),
        "wrapup_code": participant.wrapup_code,
        "acw_seconds": participant.acw_seconds,
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


# -- the ingest worker's listeners ---------------------------------------------------------------------


def after_commit_listeners() -> list[Callable[[BatchResult], None]]:
    """For the ingest worker (and the benchmark, which must match it) to call at start: says where hooks run.
    Hooks need no after-commit listener: celery beat sweeps when there is a broker, and without one the
    in-process runner (tasks.in_process_hooks) sweeps on its own clock, whether batches commit or not."""
    announce_mode()
    return []
