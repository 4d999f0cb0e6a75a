"""The read-only JSON API: token or session authentication, the same filters as the history, cursor pages."""
from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from conversations import services
from conversations.models import ApiToken, Conversation, HookDelivery
from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db

LIST = "/api/conversations/"
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def make_token(user: User) -> str:
    """What the admin does: keep the key's hash and prefix, hand the key out once."""
    key = secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name="BI", key_hash=hashlib.sha256(key.encode()).hexdigest(), prefix=key[:8])
    return key


@pytest.fixture
def bi_user() -> User:
    """A token reads only what its user's session may: the BI account is staff."""
    return get_user_model().objects.create_user("powerbi", password="unused", is_staff=True)


@pytest.fixture
def token(bi_user: User) -> str:
    return make_token(bi_user)


def get(path: str, token: str | None = None, **params: str) -> dict:
    headers = {"Authorization": f"Token {token}"} if token else {}
    response = Client().get(path, params, headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


def conversation(n: int, **fields: object) -> Conversation:
    values = {"conversation_id": f"conv-{n:04d}", "state": "wrapped_up", "media_type": "voice",
              "direction": "inbound", "queue_id": "q-support", "agent_id": "agent-1", "ani": "tel:+35315550123",
              "wrapup_code": "code-resolved", "started_at": T0 + timedelta(minutes=n)}
    return Conversation.objects.create(**{**values, **fields})


def test_without_credentials_the_api_answers_401_with_a_challenge() -> None:
    response = Client().get(LIST)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Token")
    assert "error" in response.json()


def test_an_unknown_or_malformed_token_is_refused(token: str) -> None:
    for header in (f"Token {token}x", "Token ", f"Bearer {token}", "Basic abc"):
        assert Client().get(LIST, headers={"Authorization": header}).status_code == 401


def test_a_token_of_a_deactivated_user_is_refused(bi_user: User, token: str) -> None:
    bi_user.is_active = False
    bi_user.save()
    assert Client().get(LIST, headers={"Authorization": f"Token {token}"}).status_code == 401


def test_a_valid_token_reads_the_api_and_marks_the_token_used_once_a_minute(token: str) -> None:
    conversation(1)
    assert get(LIST, token)["results"][0]["conversation_id"] == "conv-0001"
    used = ApiToken.objects.get().last_used_at
    assert used is not None and timezone.now() - used < timedelta(seconds=30)
    with CaptureQueriesContext(connection) as queries:
        get(LIST, token)
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    ApiToken.objects.update(last_used_at=timezone.now() - timedelta(minutes=5))
    get(LIST, token)
    assert timezone.now() - ApiToken.objects.get().last_used_at < timedelta(seconds=30)


def test_a_staff_session_reads_the_api_and_other_sessions_are_refused() -> None:
    conversation(1)
    staff = Client()
    staff.force_login(get_user_model().objects.create_user("supervisor", is_staff=True))
    assert staff.get(LIST).json()["results"][0]["conversation_id"] == "conv-0001"
    agent = Client()
    agent.force_login(get_user_model().objects.create_user("agent"))
    assert agent.get(LIST).status_code == 403


def test_the_api_is_read_only(token: str) -> None:
    response = Client().post(LIST, {}, headers={"Authorization": f"Token {token}"})
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD" and "read-only" in response.json()["error"]


def test_the_list_takes_the_history_filters(token: str) -> None:
    conversation(1)
    conversation(2, state="active")
    conversation(3, media_type="chat", queue_id="q-chat")
    conversation(4, direction="outbound", agent_id="agent-9", wrapup_code="code-sale", ani="tel:+4930111")
    ids = lambda **params: [r["conversation_id"] for r in get(LIST, token, **params)["results"]]
    assert ids() == ["conv-0004", "conv-0003", "conv-0002", "conv-0001"]
    assert ids(state="active") == ["conv-0002"]
    assert ids(media="chat") == ["conv-0003"] == ids(queue="q-chat")
    assert ids(direction="outbound") == ids(agent="agent-9") == ids(wrapup="code-sale") == ["conv-0004"]
    assert ids(q="+4930111") == ["conv-0004"]
    assert ids(**{"from": "2026-11-20T09:02:00Z", "to": "2026-11-20T09:03:30Z"}) == ["conv-0003", "conv-0002"]


def test_a_bad_filter_is_a_400_naming_the_parameter(token: str) -> None:
    response = Client().get(LIST, {"state": "sleeping"}, headers={"Authorization": f"Token {token}"})
    assert response.status_code == 400 and "state" in response.json()["error"]
    response = Client().get(LIST, {"limit": "100000"}, headers={"Authorization": f"Token {token}"})
    assert response.status_code == 400 and "limit" in response.json()["error"]


def test_following_next_walks_every_row_once_without_counting(token: str) -> None:
    for n in range(1, 24):
        conversation(n, started_at=T0 + timedelta(minutes=n // 2))  # pairs share a start time
    seen: list[str] = []
    url: str | None = f"http://testserver{LIST}?limit=5&media=voice"
    with CaptureQueriesContext(connection) as queries:
        while url:
            page = Client().get(url, headers={"Authorization": f"Token {token}"}).json()
            seen += [r["conversation_id"] for r in page["results"]]
            url = page["next"]
            assert url is None or "media=voice" in url
    assert sorted(seen) == [f"conv-{n:04d}" for n in range(1, 24)] and len(seen) == 23
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]


def test_the_detail_has_participants_events_with_payloads_and_hook_deliveries(token: str) -> None:
    services.ingest_batch(events=[typed(p) for p in lifecycle("conv-a")], source="sse")
    HookDelivery.objects.create(conversation=Conversation.objects.get(conversation_id="conv-a"), trigger="end",
                                hook="crm.sync", idempotency_key=uuid.uuid4().hex, status="succeeded", attempts=1)
    body = get(reverse("conversations:api-conversation-detail", args=["conv-a"]), token)
    assert body["state"] == "wrapped_up" and body["wrapup_notes"] == "Kundin zufrieden ✓"
    assert next(e["event_type"] for e in body["events"]) == "conversation:start" and len(body["events"]) == 5
    assert body["events"][-1]["payload"]["wrapup"]["name"] == "Resolved"
    assert {p["name"] for p in body["participants"]} == {"Zoë Ó Briain", "José Müller", "李雷"}
    ours = [h for h in body["hook_deliveries"] if h["hook"] == "crm.sync"]
    assert [(h["trigger"], h["status"], h["attempts"], h["last_error"]) for h in ours] == [
        ("end", "succeeded", 1, "")]


def test_an_unknown_conversation_is_a_json_404(token: str) -> None:
    response = Client().get("/api/conversations/nope/", headers={"Authorization": f"Token {token}"})
    assert response.status_code == 404 and response.json() == {"error": "no such conversation"}
