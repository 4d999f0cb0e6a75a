"""The operators' console: every list and detail page opens with data, and its query count does not grow with
the number of rows (5 rows, then 50: the same counts). No page counts a table or reads DISTINCT values."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from conversations import services
from conversations.events import Reject
from conversations.models import (
    ApiToken,
    Conversation,
    Event,
    HookDelivery,
    RejectedEvent,
    StreamCheckpoint,
    StreamConnection,
    WorkerHeartbeat,
)
from tests.factories import BASE_TIME, lifecycle, payload, typed

pytestmark = pytest.mark.django_db

DETAIL_CONVERSATION = "conv-0000"


@pytest.fixture(autouse=True)
def no_configured_hooks(settings: Any) -> None:
    """Deliveries are written by the tests below, so their number is known."""
    settings.CONVERSATION_HOOKS = {"end": [], "wrapup": []}


@pytest.fixture
def operator(client: Client) -> Client:
    user = User.objects.create_superuser("operator", "operator@example.com", "pw")
    client.force_login(user)
    return client


class World:
    """Rows of every kind the console shows; `grow_to(n)` adds rows until there are n of each."""

    def __init__(self) -> None:
        self.size = 0
        self.user = User.objects.create_user("api-user")

    def grow_to(self, n: int) -> None:
        for i in range(self.size, n):
            self.add_one(i)
        self.size = n

    def add_one(self, i: int) -> None:
        cid = f"conv-{i:04d}"
        services.ingest_batch(events=[typed(p) for p in lifecycle(cid, offset=i * 120)], source="sse")
        self.add_detail_rows(i)
        reject = Reject(source="sse", raw=f"{{broken {i}", error="JSONDecodeError: x", sse_id=str(i))
        services.ingest_batch(events=[], rejects=[reject], source="sse")
        conversation = Conversation.objects.get(conversation_id=cid)
        HookDelivery.objects.create(conversation=conversation, trigger="end", hook="tests.hooks.crm",
                                    idempotency_key=f"key-{i}", status="failed", attempts=3,
                                    last_error="ConnectionError: CRM down")
        connected = BASE_TIME + timedelta(minutes=10 * i)
        StreamConnection.objects.create(source="sse" if i % 2 else "notifications", worker=f"host:{i}",
                                        connected_at=connected,
                                        last_heartbeat_at=connected + timedelta(minutes=5),
                                        disconnected_at=connected + timedelta(minutes=9) if i % 3 else None,
                                        disconnect_reason="read timeout" if i % 3 else "")
        WorkerHeartbeat.objects.create(worker=f"host:{i}", source="sse", started_at=connected,
                                       beat_at=datetime.now(UTC), connected=bool(i % 2), events_committed=i)
        StreamCheckpoint.objects.create(source=f"source-{i}", last_event_id=str(i), events_committed=i)
        ApiToken.objects.create(user=self.user, name=f"token {i}", prefix=f"pre{i:05d}",
                                key_hash=hashlib.sha256(b"%d" % i).hexdigest())

    def add_detail_rows(self, i: int) -> None:
        """The detail conversation gets one more event, participant and delivery per row of the world."""
        agent = {"participantId": f"extra-{i}", "purpose": "agent", "userId": f"user-x{i}",
                 "name": f"Agent {i}"}
        update = payload("update", DETAIL_CONVERSATION, 30 + i / 100, participants=[agent])
        services.ingest_batch(events=[typed(update)], source="sse")
        conversation = Conversation.objects.get(conversation_id=DETAIL_CONVERSATION)
        HookDelivery.objects.create(conversation=conversation, trigger="wrapup", hook=f"tests.hooks.h{i}",
                                    idempotency_key=f"detail-{i}", status="succeeded", attempts=1)


@pytest.fixture
def world() -> World:
    return World()


def changelist(model: str, query: str = "") -> str:
    return reverse(f"admin:conversations_{model}_changelist") + query


def detail(obj: Any) -> str:
    return reverse(f"admin:conversations_{obj._meta.model_name}_change", args=[obj.pk])


LISTS = [
    changelist("conversation"),
    changelist("conversation", "?state=wrapped_up&media_type=voice&direction=inbound&queue_id=queue-billing"),
    changelist("conversation", "?q=%2B35315550123"),
    changelist("conversation", "?started_at__year=2026&started_at__month=11"),
    changelist("conversation", "?started_at__year=2026&started_at__month=11&started_at__day=28"),
    changelist("event"),
    changelist("event", "?kind=update&source=sse&event_type=conversation%3Aupdate"),
    changelist("event", f"?q={DETAIL_CONVERSATION}"),
    changelist("rejectedevent"),
    changelist("rejectedevent", "?reprocessed=no&source=sse"),
    changelist("hookdelivery"),
    changelist("hookdelivery", "?status=failed&trigger=end"),
    changelist("streamcheckpoint"),
    changelist("streamconnection"),
    changelist("streamconnection", "?source=sse&open=yes"),
    changelist("workerheartbeat"),
    changelist("apitoken"),
]


def detail_pages() -> list[str]:
    return [
        detail(Conversation.objects.get(conversation_id=DETAIL_CONVERSATION)),
        detail(Event.objects.filter(conversation_id=DETAIL_CONVERSATION).earliest("pk")),
        detail(RejectedEvent.objects.earliest("pk")),
        detail(HookDelivery.objects.earliest("pk")),
        detail(StreamCheckpoint.objects.get(source="sse")),
        detail(StreamConnection.objects.earliest("pk")),
        detail(WorkerHeartbeat.objects.earliest("pk")),
        detail(ApiToken.objects.earliest("pk")),
        reverse("admin:conversations_apitoken_add"),
        reverse("admin:index"),
    ]


def query_counts(client: Client, urls: list[str]) -> dict[str, int]:
    counts = {}
    for url in urls:
        with CaptureQueriesContext(connection) as queries:
            response = client.get(url)
        assert response.status_code == 200, url
        counts[url] = len(queries)
    return counts


def captured_sql(client: Client, url: str) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return [q["sql"] for q in queries.captured_queries]


def test_every_list_and_detail_page_takes_as_many_queries_for_50_rows_as_for_5(operator: Client,
                                                                                world: World) -> None:
    world.grow_to(5)
    urls = LISTS + detail_pages()
    query_counts(operator, urls)  # warm-up: per-process caches (content types) fill on the first visit
    small = query_counts(operator, urls)
    world.grow_to(50)
    large = query_counts(operator, urls)
    assert large == small
    assert max(small.values()) <= 12, small


def test_no_list_counts_rows_or_reads_distinct_values(operator: Client, world: World) -> None:
    world.grow_to(5)
    for url in LISTS:
        for sql in captured_sql(operator, url):
            assert '"__count"' not in sql, (url, sql)
            assert "DISTINCT" not in sql.upper(), (url, sql)


def test_the_pages_show_the_rows(operator: Client, world: World) -> None:
    world.grow_to(5)
    conversations = operator.get(changelist("conversation")).content.decode()
    assert "conv-0004" in conversations and "李雷" in conversations and "Billing" in conversations
    assert "1m 00s" in conversations  # duration from started/ended
    assert "Resolved" in conversations and "code-resolved" in conversations
    assert "5 conversations" in conversations

    conversation = Conversation.objects.get(conversation_id=DETAIL_CONVERSATION)
    page = operator.get(detail(conversation)).content.decode()
    assert "Events" in page and "conversation:wrapup" in page
    assert "&quot;eventType&quot;: &quot;conversation:update&quot;" in page  # pretty-printed JSON
    assert "Kundin zufrieden ✓" in page and "Agent 4" in page and "tests.hooks.h4" in page
    assert f"?q={DETAIL_CONVERSATION}" in page  # the link to all its events

    rejects = operator.get(changelist("rejectedevent")).content.decode()
    assert "{broken 3" in rejects and "JSONDecodeError" in rejects
    deliveries = operator.get(changelist("hookdelivery", "?status=failed")).content.decode()
    assert "ConnectionError: CRM down" in deliveries and "conv-0002" in deliveries


def test_events_on_a_conversation_page_are_the_newest_200_with_a_link_to_all(operator: Client) -> None:
    cid = "conv-long"
    services.ingest_batch(events=[typed(payload("update", cid, s)) for s in range(205)], source="sse")
    conversation = Conversation.objects.get(conversation_id=cid)
    page = operator.get(detail(conversation)).content.decode()
    assert "the newest 200" in page and "All events of this conversation" in page
    assert page.count("<summary>JSON</summary>") == 200
    newest, oldest_shown = "09:03:24", "09:00:05"  # 204 s and 5 s after the first
    assert newest in page and oldest_shown in page and "09:00:04.000" not in page
    assert page.index(newest) < page.index(oldest_shown)


def test_search_is_exact_on_id_ani_dnis_and_agent(operator: Client, world: World) -> None:
    world.grow_to(3)

    def found(term: str) -> list[str]:
        response = operator.get(changelist("conversation"), {"q": term})
        return sorted(c.conversation_id for c in response.context["cl"].result_list)

    assert found("conv-0001") == ["conv-0001"]
    assert found("conv-000") == []  # exact, so the index is used
    assert found("+35315550123") == ["conv-0000", "conv-0001", "conv-0002"]  # with or without tel:
    assert found("tel:+35318880000") == ["conv-0000", "conv-0001", "conv-0002"]
    assert found(" 李雷 ") == ["conv-0000", "conv-0001", "conv-0002"]
    assert found("José Müller") == []  # the agent is the latest one, after the transfer
    assert found("user-2") == ["conv-0000", "conv-0001", "conv-0002"]


def test_filter_options_come_from_the_index_with_names(operator: Client, world: World) -> None:
    world.grow_to(2)
    chat = payload("start", "conv-chat", 5, mediaType="chat", direction="outbound", queueId="queue-sales",
                   queueName="Sales")
    services.ingest_batch(events=[typed(chat)], source="sse")
    spec = {s.title: s for s in operator.get(changelist("conversation")).context["cl"].filter_specs}
    assert spec["queue"].lookup_choices == [("queue-billing", "Billing"), ("queue-sales", "Sales")]
    assert spec["media"].lookup_choices == [("chat", "chat"), ("voice", "voice")]
    assert spec["direction"].lookup_choices == [("inbound", "inbound"), ("outbound", "outbound")]
    chosen = operator.get(changelist("conversation"), {"queue_id": "queue-sales"}).context["cl"]
    assert [c.conversation_id for c in chosen.result_list] == ["conv-chat"]


def test_filter_options_are_bounded_and_keep_the_chosen_value(operator: Client, monkeypatch: Any) -> None:
    from conversations import admin as console

    monkeypatch.setattr(console, "MAX_FILTER_OPTIONS", 3)
    services.ingest_batch(events=[typed(payload("start", f"c{i}", i, queueId=f"q{i}")) for i in range(6)],
                          source="sse")
    spec = {s.title: s for s in operator.get(changelist("conversation"), {"queue_id": "q5"})
            .context["cl"].filter_specs}
    assert [value for value, _ in spec["queue"].lookup_choices] == ["q0", "q1", "q2", "q5"]


def test_a_long_list_pages_without_counting_and_never_shows_all(operator: Client, monkeypatch: Any) -> None:
    from django.contrib import admin

    monkeypatch.setattr(admin.site._registry[Event], "list_per_page", 10)
    services.ingest_batch(events=[typed(payload("update", "conv-1", s)) for s in range(25)], source="sse")

    first = operator.get(changelist("event")).content.decode()
    assert "Events 1–10, more on the next page" in first and "?p=2" in first and "?p=3" not in first
    second = operator.get(changelist("event", "?p=2"))
    assert len(second.context["cl"].result_list) == 10 and "?p=3" in second.content.decode()
    last = operator.get(changelist("event", "?p=3"))
    assert len(last.context["cl"].result_list) == 5 and "25 events" in last.content.decode()
    everything = operator.get(changelist("event", "?all="))
    assert len(everything.context["cl"].result_list) == 10  # "show all" is refused for a multi-page list
    for url in (changelist("event"), changelist("event", "?p=2"), changelist("event", "?all=")):
        assert not [sql for sql in captured_sql(operator, url) if '"__count"' in sql]
    assert operator.get(changelist("event", "?p=9")).status_code == 302  # past the end, as the stock admin


def test_the_date_hierarchy_offers_periods_between_the_first_and_last_conversation(operator: Client) -> None:
    for cid, when in (("old", "2025-11-20T10:00:00Z"), ("new", "2026-02-03T10:00:00Z")):
        services.ingest_batch(events=[typed({"eventType": "conversation:start", "conversationId": cid,
                                             "timestamp": when})], source="sse")

    def nav(query: str = "") -> list[str]:
        return [c["title"] for c in operator.get(changelist("conversation", query)).context["cl"]
                .date_navigation()["choices"]]

    assert nav() == ["2025", "2026"]
    assert nav("?started_at__year=2025") == ["November 2025", "December 2025"]
    assert nav("?started_at__year=2026") == ["January 2026", "February 2026"]
    assert nav("?started_at__year=2026&started_at__month=2") == ["February 1", "February 2", "February 3"]
    assert nav("?started_at__year=2025&started_at__month=11")[0] == "November 20"
    december = operator.get(changelist("conversation", "?started_at__year=2025&started_at__month=12"))
    assert list(december.context["cl"].result_list) == []  # offered, but without rows
    day = operator.get(changelist("conversation"),
                       {"started_at__year": 2026, "started_at__month": 2, "started_at__day": 3})
    assert [c.conversation_id for c in day.context["cl"].result_list] == ["new"]


def test_stream_health_reads_at_a_glance(operator: Client) -> None:
    now = datetime.now(UTC)
    StreamCheckpoint.objects.create(source="sse", last_event_id="41", events_committed=41)
    StreamConnection.objects.create(source="sse", connected_at=now - timedelta(hours=2),
                                    last_heartbeat_at=now - timedelta(minutes=70),
                                    disconnected_at=now - timedelta(minutes=65),
                                    disconnect_reason="read timeout")
    StreamConnection.objects.create(source="sse", connected_at=now - timedelta(minutes=64, seconds=30),
                                    last_heartbeat_at=now - timedelta(seconds=5))
    WorkerHeartbeat.objects.create(worker="host:1", source="sse", started_at=now - timedelta(hours=3),
                                   beat_at=now - timedelta(seconds=2), connected=True)
    WorkerHeartbeat.objects.create(worker="host:0", source="sse", started_at=now - timedelta(days=2),
                                   beat_at=now - timedelta(hours=5))

    checkpoints = operator.get(changelist("streamcheckpoint")).content.decode()
    assert ">live</a>" in checkpoints and "read timeout" in checkpoints and "1h 04m" in checkpoints
    connections = operator.get(changelist("streamconnection")).content.decode()
    assert "30s" in connections  # the gap between the two connections
    assert "first" in connections and "closed" in connections and "so far" in connections
    workers = operator.get(changelist("workerheartbeat")).context["cl"]
    assert [(w.worker, workers.model_admin.alive(w)) for w in workers.result_list] == [("host:1", True),
                                                                                        ("host:0", False)]



def test_events_are_never_added_edited_or_deleted_from_the_admin(operator: Client) -> None:
    services.ingest_batch(events=[typed(p) for p in lifecycle("conv-1")], source="sse")
    event = Event.objects.earliest("pk")
    page = operator.get(detail(event)).content.decode()
    assert "&quot;conversationId&quot;: &quot;conv-1&quot;" in page  # the payload, pretty-printed
    assert 'name="_save"' not in page and "deletelink" not in page

    listing = operator.get(changelist("event"))
    assert listing.context["action_form"] is None  # no bulk delete, no action at all
    operator.post(changelist("event"), {"action": "delete_selected", "_selected_action": [str(event.pk)],
                                        "index": "0", "post": "yes"})
    assert operator.post(detail(event), {"event_type": "tampered"}).status_code == 403
    assert operator.post(reverse("admin:conversations_event_delete", args=[event.pk]), {"post": "yes"}
                         ).status_code == 403
    assert operator.get(reverse("admin:conversations_event_add")).status_code == 403
    assert Event.objects.count() == 5 and Event.objects.get(pk=event.pk).event_type == "conversation:start"


def test_an_api_token_shows_its_key_once_and_stores_only_the_hash(operator: Client, caplog: Any) -> None:
    owner = User.objects.create_user("reporting", is_staff=True)
    response = operator.post(reverse("admin:conversations_apitoken_add"),
                             {"user": owner.pk, "name": "BI export"}, follow=True)

    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    key = response.context["key"]
    token = ApiToken.objects.get()
    assert len(key) >= 40 and key in response.content.decode()
    assert token.key_hash == hashlib.sha256(key.encode()).hexdigest() and token.prefix == key[:8]
    assert (token.user, token.name) == (owner, "BI export")
    assert key not in operator.get(detail(token)).content.decode()
    assert key not in operator.get(changelist("apitoken")).content.decode()
    assert key not in caplog.text and token.prefix in caplog.text
