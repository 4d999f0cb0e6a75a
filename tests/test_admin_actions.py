"""The console's actions end to end, through the admin as an operator uses them (a POST to the changelist):
reprocessing rejects through the pipeline, and re-running hook deliveries on Celery (eager: in-process)."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from conversations import hooks, services
from conversations.events import Reject
from conversations.models import Conversation, Event, HookDelivery, RejectedEvent
from conversations.normalize import normalize_sse
from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db(transaction=True)  # real commits: hooks run after commit, as in production

CRM = "tests.test_admin_actions.crm_hook"
CALLS: list[tuple[str, str]] = []  # (conversation id, trigger)
CRM_STATE = {"up": True}


def crm_hook(conversation_id: str, summary: dict[str, Any], idempotency_key: str) -> None:
    CALLS.append((conversation_id, summary["trigger"]))
    if not CRM_STATE["up"]:
        raise hooks.PermanentHookError("CRM answered 422: unknown queue")


@pytest.fixture(autouse=True)
def eager_hooks(settings: Any) -> Iterator[None]:
    """Hooks run in-process after commit (Celery eager), whatever broker the environment configures."""
    from monitor_project.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    settings.CONVERSATION_HOOKS = {"end": [CRM], "wrapup": [CRM]}
    CALLS.clear()
    CRM_STATE["up"] = True
    yield
    app.conf.task_always_eager = previous


@pytest.fixture
def operator(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("operator", "operator@example.com", "pw"))
    return client


def run_action(client: Client, model: str, action: str, pks: list[int], *,
               select_across: bool = False) -> list[str]:
    url = reverse(f"admin:conversations_{model}_changelist")
    data = {"action": action, "_selected_action": [str(pk) for pk in pks], "index": "0",
            "select_across": "1" if select_across else "0"}
    response = client.post(url, data, follow=True)
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]


def stored_as_reject(payload: dict[str, Any], *, sse_id: str, minutes_ago: int = 0) -> RejectedEvent:
    """The raw text of a valid event, as an older release that could not parse it kept it."""
    return RejectedEvent.objects.create(
        source="sse", raw=orjson.dumps(payload).decode(), sse_id=sse_id,
        error="PayloadError: timestamp is not an ISO 8601 time (before the fix)",
        received_at=datetime.now(UTC) - timedelta(minutes=minutes_ago),
    )


def broken_reject(raw: str, *, sse_id: str) -> RejectedEvent:
    """Rejected by the real pipeline, and still unparseable."""
    reject = normalize_sse(raw, sse_id=sse_id)
    assert isinstance(reject, Reject)
    services.ingest_batch(events=[], rejects=[reject], source="sse")
    return RejectedEvent.objects.get(sse_id=sse_id)


def test_reprocess_stores_what_parses_now_and_keeps_what_still_fails(operator: Client) -> None:
    fixed = [stored_as_reject(p, sse_id=str(n)) for n, p in enumerate(lifecycle("conv-r"))]
    keepalive = stored_as_reject({}, sse_id="ka")
    broken = broken_reject('{"eventType": "conversation:start", ', sse_id="99")
    RejectedEvent.objects.filter(pk=broken.pk).update(error="an error from an older release")

    messages = run_action(operator, "rejectedevent", "reprocess", [r.pk for r in [*fixed, keepalive, broken]])

    assert messages == ["6 reprocessed (5 new events, 0 already stored); 1 still failing (error updated)."]
    conversation = Conversation.objects.get(conversation_id="conv-r")
    assert (conversation.state, conversation.agent_name, conversation.wrapup_name) == ("wrapped_up", "李雷",
                                                                                       "Resolved")
    assert sorted(Event.objects.values_list("sse_id", flat=True)) == ["0", "1", "2", "3", "4"]
    assert RejectedEvent.objects.filter(reprocessed_at__isnull=False).count() == 6
    broken.refresh_from_db()
    assert broken.reprocessed_at is None and broken.error.startswith("JSONDecodeError")
    assert broken.raw == '{"eventType": "conversation:start", '
    assert sorted(CALLS) == [("conv-r", "end"), ("conv-r", "wrapup")]  # post-call hooks ran, once each

    again = run_action(operator, "rejectedevent", "reprocess", [r.pk for r in fixed])
    assert again == ["Nothing to reprocess: the selected rejects were all reprocessed before."]
    assert Event.objects.count() == 5 and len(CALLS) == 2


def test_reprocess_after_an_interrupted_run_counts_duplicates_and_marks_the_rejects(operator: Client) -> None:
    payloads = lifecycle("conv-i")
    rejects = [stored_as_reject(p, sse_id=str(n)) for n, p in enumerate(payloads)]
    services.ingest_batch(events=[typed(p) for p in payloads[:3]], source="sse")  # stored, but not marked

    messages = run_action(operator, "rejectedevent", "reprocess", [r.pk for r in rejects])

    assert messages == ["5 reprocessed (2 new events, 3 already stored); 0 still failing (error updated)."]
    assert Event.objects.count() == 5
    assert not RejectedEvent.objects.filter(reprocessed_at__isnull=True).exists()


def test_reprocess_of_a_whole_selection_takes_the_oldest_first_and_says_more_remain(operator: Client,
                                                                                    monkeypatch: Any) -> None:
    from conversations import admin as console

    monkeypatch.setattr(console, "REPROCESS_PER_ACTION", 2)
    payloads = lifecycle("conv-m")
    rejects = [stored_as_reject(p, sse_id=str(n), minutes_ago=10 - n) for n, p in enumerate(payloads)]

    messages = run_action(operator, "rejectedevent", "reprocess", [rejects[4].pk], select_across=True)

    assert messages == [("2 reprocessed (2 new events, 0 already stored); 0 still failing (error updated). "
                         "Only the oldest 2 were taken: run the action again for the rest.")]
    done = RejectedEvent.objects.filter(reprocessed_at__isnull=False).values_list("sse_id", flat=True)
    assert sorted(done) == ["0", "1"]


def test_rerun_runs_a_failed_delivery_again_after_the_receiver_is_fixed(operator: Client) -> None:
    CRM_STATE["up"] = False
    ended = lifecycle("conv-h")[:4]  # start ... end: the "end" hook runs, and fails
    services.ingest_batch(events=[typed(p) for p in ended], source="sse")
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.trigger) == ("failed", 1, "end")
    assert "422" in delivery.last_error

    CRM_STATE["up"] = True
    messages = run_action(operator, "hookdelivery", "rerun", [delivery.pk])

    assert messages == ["1 hook deliveries queued to run again."]
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("succeeded", 2)
    assert CALLS == [("conv-h", "end"), ("conv-h", "end")]


def test_rerun_of_a_running_delivery_leaves_it_alone(operator: Client) -> None:
    services.ingest_batch(events=[typed(p) for p in lifecycle("conv-run")[:4]], source="sse")
    HookDelivery.objects.update(status="running")

    pks = list(HookDelivery.objects.values_list("pk", flat=True))
    messages = run_action(operator, "hookdelivery", "rerun", pks)

    assert messages == ["0 hook deliveries queued to run again."]
    assert HookDelivery.objects.get().attempts == 1 and len(CALLS) == 1


def test_an_operator_who_may_only_view_gets_no_actions(client: Client) -> None:
    viewer = User.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_rejectedevent",
                                                                          "view_hookdelivery"]))
    client.force_login(viewer)
    reject = broken_reject("{nope", sse_id="1")

    for model in ("rejectedevent", "hookdelivery"):
        response = client.get(reverse(f"admin:conversations_{model}_changelist"))
        assert response.status_code == 200 and response.context["action_form"] is None
    client.post(reverse("admin:conversations_rejectedevent_changelist"),
                {"action": "reprocess", "_selected_action": [str(reject.pk)], "index": "0"})
    reject.refresh_from_db()
    assert reject.error.startswith("JSONDecodeError") and reject.reprocessed_at is None
