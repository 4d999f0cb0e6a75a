"""API tokens grant exactly what their user's session grants, checked on every request; the admin issues them
only to users who may watch, and shows a new key once, on a page a refresh cannot post again."""
from __future__ import annotations

import hashlib
import secrets

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from conversations.models import ApiToken, Conversation

pytestmark = pytest.mark.django_db

LIST = "/api/conversations/"


def make_token(user: User) -> str:
    """A token stored as the admin stores it (hash and prefix), for a user the admin form would now refuse."""
    key = secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name="BI", key_hash=hashlib.sha256(key.encode()).hexdigest(), prefix=key[:8])
    return key


def api_get(key: str, path: str = LIST) -> int:
    return Client().get(path, headers={"Authorization": f"Token {key}"}).status_code


@pytest.fixture
def operator() -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("operator", "operator@example.com", "pw"))
    return client


def test_a_token_of_a_user_who_is_not_staff_is_refused_like_that_users_session() -> None:
    Conversation.objects.create(conversation_id="conv-1", state="active")
    agent = User.objects.create_user("agent")
    response = Client().get(LIST, headers={"Authorization": f"Token {make_token(agent)}"})
    assert response.status_code == 403 and "error" in response.json()
    session = Client()
    session.force_login(agent)
    assert session.get(LIST).status_code == 403
    detail = reverse("conversations:api-conversation-detail", args=["conv-1"])
    assert api_get(make_token(agent), detail) == 403  # the raw payloads too
    assert ApiToken.objects.filter(last_used_at__isnull=False).count() == 0  # a refused token is not "used"


def test_a_demoted_staff_users_old_token_stops_at_the_next_request() -> None:
    supervisor = User.objects.create_user("supervisor", is_staff=True)
    key = make_token(supervisor)
    assert api_get(key) == 200
    supervisor.is_staff = False
    supervisor.save()
    assert api_get(key) == 403


def test_a_deactivated_users_token_stops_at_the_next_request() -> None:
    supervisor = User.objects.create_user("supervisor", is_staff=True)
    key = make_token(supervisor)
    assert api_get(key) == 200
    supervisor.is_active = False
    supervisor.save()
    assert api_get(key) == 401


def test_the_admin_refuses_a_token_for_a_user_who_may_not_watch(operator: Client) -> None:
    agent = User.objects.create_user("agent")
    retired = User.objects.create_user("retired", is_staff=True, is_active=False)
    for user in (agent, retired):
        response = operator.post(reverse("admin:conversations_apitoken_add"), {"user": user.pk, "name": "BI"})
        assert response.status_code == 200  # the form again, with the error on the field
        errors = response.context["adminform"].form.errors
        assert list(errors) == ["user"] and "not active staff" in errors["user"][0]
        assert user.username in response.content.decode()
    assert not ApiToken.objects.exists()


def test_creating_a_token_redirects_and_its_page_shows_the_key_once(operator: Client) -> None:
    owner = User.objects.create_user("reporting", is_staff=True)
    response = operator.post(reverse("admin:conversations_apitoken_add"), {"user": owner.pk, "name": "BI"})
    token = ApiToken.objects.get()
    key_page = reverse("admin:conversations_apitoken_key", args=[token.pk])
    assert response.status_code == 302 and response["Location"] == key_page

    first = operator.get(key_page)
    key = first.context["key"]
    assert first.status_code == 200 and "no-store" in first["Cache-Control"]
    assert key and key in first.content.decode() and token.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in str(operator.session.items())  # taken out of the session as it was shown

    refreshed = operator.get(key_page)  # a refresh: no key, and no second token
    assert refreshed.status_code == 200 and refreshed.context["key"] is None
    assert key not in refreshed.content.decode() and "already shown" in refreshed.content.decode()
    assert ApiToken.objects.count() == 1
    assert api_get(key) == 200
