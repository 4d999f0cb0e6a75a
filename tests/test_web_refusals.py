"""Bad or refused requests get a clear, cheap answer: the right status, a readable body, at most one short log
line and never a traceback (unknown sockets, the lifespan scope, writes to the API, bad filters, 403s, /readyz)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import OperationalError, connection
from django.test import Client
from django.urls import reverse

from conversations import selectors
from conversations.models import ApiToken, Conversation
from conversations.routing import websocket_urlpatterns
from monitor_project.asgi import application  # at import: setting Django up again reconfigures logging (caplog's too)

ORIGIN = (b"origin", b"http://localhost")
API_PATHS = ("/api/conversations/", "/api/conversations/conv-1/")
# A generous deadline for what normally takes milliseconds: a passing test never waits it out, a loaded one may
# need seconds.
WAIT = 30.0


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=2 * WAIT))


def loud_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What an operator would see as a problem: a WARNING or worse, or anything with a traceback."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def staff_token() -> str:
    key = secrets.token_urlsafe(32)
    user = User.objects.create_user("powerbi", is_staff=True)
    ApiToken.objects.create(user=user, key_hash=hashlib.sha256(key.encode()).hexdigest(), prefix=key[:8])
    return key


def staff_session(*, enforce_csrf_checks: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    client.force_login(User.objects.create_user("supervisor", is_staff=True))
    return client


# -- WebSockets and the lifespan scope ----------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_a_socket_to_an_unknown_path_is_refused_in_one_quiet_line(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        for app in (application, URLRouter(websocket_urlpatterns)):
            communicator = WebsocketCommunicator(app, "/ws/nope/", headers=[ORIGIN])
            connected, _ = await communicator.connect(timeout=WAIT)
            assert not connected
            await communicator.wait(timeout=WAIT)

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert not loud_records(caplog)
    refusals = [r for r in caplog.records if "no route for /ws/nope/" in r.getMessage()]
    assert len(refusals) == 2  # one line per socket


def test_the_lifespan_scope_uvicorn_sends_completes_without_an_error(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        lifespan = ApplicationCommunicator(application, {"type": "lifespan", "asgi": {"version": "3.0"}})
        await lifespan.send_input({"type": "lifespan.startup"})
        assert await lifespan.receive_output(timeout=WAIT) == {"type": "lifespan.startup.complete"}
        await lifespan.send_input({"type": "lifespan.shutdown"})
        assert await lifespan.receive_output(timeout=WAIT) == {"type": "lifespan.shutdown.complete"}
        await lifespan.wait(timeout=WAIT)

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    assert not loud_records(caplog)


# -- the read-only API --------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_writes_to_the_api_are_a_json_405_for_token_and_session_clients_alike() -> None:
    """The session client enforces CSRF as a browser's would: the 405 must not turn into the HTML CSRF page."""
    headers = {"Authorization": f"Token {staff_token()}"}
    session = staff_session(enforce_csrf_checks=True)
    for path in API_PATHS:
        for method in ("post", "put", "patch", "delete", "options"):
            for response in (getattr(Client(enforce_csrf_checks=True), method)(path, headers=headers),
                             getattr(session, method)(path)):
                assert response.status_code == 405, (method, path, response.content[:80])
                assert response["Content-Type"] == "application/json" and response["Allow"] == "GET, HEAD"
                assert "read-only" in response.json()["error"]


# -- filters ------------------------------------------------------------------------------------------------
BAD_FILTERS = {"state": "bogus", "direction": "sideways", "media": "anything"}


@pytest.mark.django_db
@pytest.mark.parametrize("param", sorted(BAD_FILTERS))
def test_an_unknown_enumerated_filter_is_a_400_naming_it_and_its_values_everywhere(param: str) -> None:
    Conversation.objects.create(conversation_id="conv-1", state="active", media_type="voice", direction="inbound")
    allowed = selectors.ENUMERATED_PARAMS[param]
    message = f"{param} must be one of {', '.join(sorted(allowed))}"
    params = {param: BAD_FILTERS[param]}

    api = Client().get("/api/conversations/", params, headers={"Authorization": f"Token {staff_token()}"})
    assert api.status_code == 400 and api.json() == {"error": message}
    supervisor = staff_session()
    page = supervisor.get(reverse("conversations:conversation-list"), params)
    assert page.status_code == 400 and message in page.content.decode() and page.context["page"].items == []
    export = supervisor.get(reverse("conversations:conversation-export"), params)
    assert export.status_code == 400 and export.content.decode().strip() == message


def test_the_allowed_values_are_those_the_normalizers_store() -> None:
    from conversations.normalize_notifications import MEDIA_OF_LIST

    assert selectors.DIRECTIONS == {"inbound", "outbound"}
    assert set(MEDIA_OF_LIST.values()) <= selectors.MEDIA_TYPES
    for media in ("voice", "chat", "callback", "email", "message", "internalmessage"):
        assert selectors.parse_filters({"media": media, "direction": "outbound"}).media == media


# -- refusals of the pages and of /readyz -------------------------------------------------------------------
@pytest.mark.django_db
def test_a_page_refused_to_a_user_who_is_not_staff_is_one_warning_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = Client()
    agent.force_login(User.objects.create_user("agent"))
    for name in ("conversations:live", "conversations:conversation-list", "conversations:conversation-export"):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            response = agent.get(reverse(name))
        assert response.status_code == 403 and "Not allowed" in response.content.decode()
        assert [r.levelname for r in loud_records(caplog)] == ["WARNING"]
        assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.django_db
def test_an_unready_probe_is_one_warning_saying_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        response = Client().get("/readyz")  # no stream worker has ever written a heartbeat
    assert response.status_code == 503 and response.json()["status"] == "unready"
    assert [(r.levelname, r.getMessage()) for r in loud_records(caplog)] == [
        ("WARNING", "readyz: not ready: stream stale: no stream worker has written a heartbeat")]
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.django_db
def test_an_unreachable_database_is_one_warning_on_readyz(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*args: object) -> None:
        raise OperationalError("connection refused")

    with caplog.at_level(logging.DEBUG), connection.execute_wrapper(refuse):
        response = Client().get("/readyz")
    assert response.status_code == 503 and response.json()["database"] == "unreachable"
    assert [(r.levelname, r.getMessage()) for r in loud_records(caplog)] == [
        ("WARNING", "readyz: not ready: database unreachable: connection refused")]
