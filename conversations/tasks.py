"""Celery tasks: thin, they take ids and call the outbox. Idempotent: a task run twice claims nothing."""
from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from conversations import outbox

logger = logging.getLogger(__name__)


@shared_task(
    name="conversations.deliver_hook",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    soft_time_limit=settings.HOOK_TASK_SOFT_TIME_LIMIT,
    time_limit=settings.HOOK_TASK_TIME_LIMIT,
)
def deliver_hook(delivery_id: int) -> str:
    """Run one hook delivery by id: claim it, call the hook, record the outcome (a retry sends itself)."""
    return outbox.run_delivery(delivery_id)


@shared_task(name="conversations.deliver_hooks", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_hooks(delivery_ids: list[int]) -> int:
    """One committed batch's deliveries, sent by the ingest worker as one message: fanned out here into one
    deliver_hook task per id (sending twice is harmless: each delivery is claimed once)."""
    return outbox.fan_out(delivery_ids)


@shared_task(name="conversations.sweep_hook_deliveries", ignore_result=True, time_limit=120)
def sweep_hook_deliveries() -> dict[str, int]:
    """Run by celery beat every HOOK_SWEEP_INTERVAL seconds."""
    result = outbox.sweep()
    return {"resent": result.resent, "released": result.released, "abandoned_failed": result.abandoned_failed}
