"""The simulator's Notifications API over real loopback HTTP and WebSocket: channels, limits, subscriptions,
the socket's heartbeats, pongs, kicks and closes, the channel clock, and the snapshot and detail-event streams
that tell the same story as the SSE stream. No database is needed.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
import requests
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conversations.genesys.scenario import AGENTS, QUEUES, Scenario
from conversations.genesys.simulator import Simulator, SimulatorServer
from conversations.genesys.simulator_notifications import (
    conversation_snapshot,
    detail_topic,
    queue_topic,
    snapshot_topics,
    user_topic,
)
from tests.factories import wait_for
from tests.test_simulator import assert_genesys_error, get_token, open_stream, read_events

DAY = 24 * 3600
DETAIL_KINDS = (
    "customer.start", "customer.end", "acd.start", "acd.end", "user.start", "user.end", "acw", "wrapup",
)
ALL_QUEUE_TOPICS = [queue_topic(queue.id) for queue in QUEUES]
# A generous deadline for what normally takes milliseconds: a passing test never waits it out, a loaded one may
# need seconds.
WAIT = 30.0
PING = '{"message":"ping"}'
PONG = {"topicName": "channel.metadata", "eventBody": {"message": "pong"}}


# --- fixtures and a small client ----------------------------------------------------------------------------


@pytest.fixture
def sim() -> Simulator:
    simulator = Simulator(client_id="sim-client", client_secret="sim-secret", seed=7, keepalive_interval=30.0)
    simulator.notifications.heartbeat_interval = 30.0  # quiet unless a test wants heartbeats
    return simulator


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as running:
        yield running


@dataclass
class Api:
    url: str
    token: str

    def call(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=WAIT, **kwargs)

    def channel(self) -> dict[str, Any]:
        response = self.call("POST", "/api/v2/notifications/channels")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def head(self, channel_id: str) -> int:
        return self.call("HEAD", f"/api/v2/notifications/channels/{channel_id}").status_code

    def subscribe(
        self, channel_id: str, topics: list[str], *, method: str = "PUT", ignore_errors: bool = False
    ) -> requests.Response:
        params = {"ignoreErrors": "true"} if ignore_errors else {}
        body = [{"id": topic} for topic in topics]
        path = f"/api/v2/notifications/channels/{channel_id}/subscriptions"
        return self.call(method, path, json=body, params=params)

    def topics(self, channel_id: str) -> list[str]:
        response = self.call("GET", f"/api/v2/notifications/channels/{channel_id}/subscriptions")
        assert response.status_code == 200, response.text
        return [entity["id"] for entity in response.json()["entities"]]


@pytest.fixture
def api(server: SimulatorServer) -> Api:
    return Api(server.url, get_token(server))


def open_socket(channel: dict[str, Any]) -> ClientConnection:
    return connect(
        channel["connectUri"], open_timeout=WAIT, close_timeout=2, ping_interval=None, compression=None
    )


def receive(ws: ClientConnection, timeout: float = WAIT) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=timeout)))


def events(ws: ClientConnection, count: int, *, timeout: float = WAIT) -> list[dict[str, Any]]:
    """The next `count` messages that are not channel.metadata (heartbeats, pongs)."""
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(received) < count:
        message = receive(ws, timeout=max(0.01, deadline - time.monotonic()))
        if message["topicName"] != "channel.metadata":
            received.append(message)
    return received


def sent_so_far(ws: ClientConnection) -> list[dict[str, Any]]:
    """Everything (but channel.metadata) the simulator has queued for this socket so far. A ping's pong takes
    the same in-order path as what was queued before it, so it marks the end: no guessing how long a busy machine
    needs to send it all."""
    ws.send(PING)
    received: list[dict[str, Any]] = []
    while (message := receive(ws)) != PONG:
        if message["topicName"] != "channel.metadata":
            received.append(message)
    return received


def until_closed(ws: ClientConnection, timeout: float = WAIT) -> tuple[list[dict[str, Any]], ConnectionClosed]:
    """Every message until the server closes the socket, and how it closed."""
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            received.append(receive(ws, timeout=max(0.01, deadline - time.monotonic())))
        except ConnectionClosed as closed:
            return received, closed


def snapshot_key(topic: str, body: dict[str, Any]) -> tuple[str, bytes]:
    return topic, orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def expected_snapshots(payloads: list[dict[str, Any]], topics: set[str]) -> Counter[tuple[str, bytes]]:
    expected: Counter[tuple[str, bytes]] = Counter()
    for payload in payloads:
        snapshot = conversation_snapshot(payload)
        expected.update(snapshot_key(t, snapshot) for t in snapshot_topics(snapshot) if t in topics)
    return expected


def lifecycle_with(predicate: Callable[[list[dict[str, Any]]], bool], seed: int = 3) -> list[dict[str, Any]]:
    scenario = Scenario(seed, reject_rate=0.5)
    for _ in range(200):
        payloads = scenario.lifecycle()
        if predicate(payloads):
            return payloads
    raise LookupError("no lifecycle matches")


def agents_of(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in payload["participants"] if p["purpose"] == "agent"]


# --- channels ---------------------------------------------------------------------------------------------


def test_a_channel_lives_24_hours_on_the_hub_clock(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    assert channel["id"].startswith("streaming-0-")
    assert channel["connectUri"] == f"ws://{api.url.removeprefix('http://')}/channels/{channel['id']}"
    expires = datetime.fromisoformat(channel["expires"])
    assert abs((expires - sim.notifications.now()) - timedelta(days=1)) < timedelta(seconds=5)
    assert api.head(channel["id"]) == 200

    sim.notifications.advance(DAY - 60)
    assert api.head(channel["id"]) == 200
    sim.notifications.advance(61)
    assert api.head(channel["id"]) == 404
    assert api.call("GET", f"/api/v2/notifications/channels/{channel['id']}/subscriptions").status_code == 404
    assert sim.notifications.stats["channels_expired"] == 1


def test_subscribing_again_extends_the_channel(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    sim.notifications.advance(DAY - 3600)
    response = api.subscribe(channel["id"], ALL_QUEUE_TOPICS[:1])
    assert response.status_code == 200
    sim.notifications.advance(2 * 3600)
    assert api.head(channel["id"]) == 200
    sim.notifications.advance(DAY)
    assert api.head(channel["id"]) == 404


def test_an_expired_channel_closes_its_socket(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    with open_socket(channel) as ws:
        assert sim.notifications.wait_for_sockets(1)
        sim.notifications.advance(DAY + 1)
        _, closed = until_closed(ws)
    assert closed.rcvd is not None and closed.rcvd.reason == "channel expired"


def test_the_21st_channel_evicts_the_oldest_and_tells_its_socket(api: Api, sim: Simulator) -> None:
    channels = [api.channel() for _ in range(20)]
    oldest = channels[0]
    with open_socket(oldest) as ws:
        assert sim.notifications.wait_for_sockets(1)
        newest = api.channel()
        messages, closed = until_closed(ws)
    assert [m["topicName"] for m in messages] == [f"v2.system.no_longer_subscribed.{oldest['id']}"]
    body = messages[0]["eventBody"]
    assert (body["systemTopicType"], body["reason"]) == ("no_longer_subscribed", "another_channel_subscribed")
    assert body["channelId"] == oldest["id"]
    assert closed.rcvd is not None and closed.rcvd.code == 1000
    assert api.head(oldest["id"]) == 404
    assert all(api.head(c["id"]) == 200 for c in [*channels[1:], newest])
    listed = api.call("GET", "/api/v2/notifications/channels").json()["entities"]
    assert [c["id"] for c in listed] == [c["id"] for c in [*channels[1:], newest]]
    assert sim.notifications.stats["evictions"] == 1


def test_a_socket_on_an_unknown_channel_is_refused(api: Api) -> None:
    channel = api.channel()
    with pytest.raises(InvalidStatus) as refused:
        connect(channel["connectUri"] + "x", open_timeout=WAIT)
    assert refused.value.response.status_code == 404


def test_rest_calls_need_a_valid_token(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    assert api.call("POST", "/api/v2/notifications/channels", token="nope").status_code == 401
    path = f"/api/v2/notifications/channels/{channel['id']}"
    assert api.call("HEAD", path, token="nope").status_code == 401
    assert api.call("GET", "/api/v2/routing/queues", token="nope").status_code == 401
    body = api.call("PUT", f"{path}/subscriptions", token="nope", json=[])
    assert body.status_code == 401 and body.json()["code"] == "bad.credentials"


def test_fail_next_answers_channel_creation_with_429_and_retry_after_then_creates(
    api: Api, sim: Simulator,
) -> None:
    sim.notifications.fail_next("create_channel", 429, count=2, retry_after=30)
    for _ in range(2):
        refused = api.call("POST", "/api/v2/notifications/channels")
        assert_genesys_error(refused, 429, "too.many.requests.retry.after")
        assert refused.headers["Retry-After"] == "30"
    assert api.channel()["id"] in sim.notifications.channel_ids()
    assert sim.notifications.stats["channels_created"] == 1


def test_fail_next_answers_subscriptions_with_429_and_changes_nothing(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    sim.notifications.fail_next("subscriptions", 429, count=2, retry_after=2)
    assert api.subscribe(channel["id"], ALL_QUEUE_TOPICS[:1]).headers["Retry-After"] == "2"
    assert api.subscribe(channel["id"], ALL_QUEUE_TOPICS[:1], method="POST").status_code == 429
    assert api.topics(channel["id"]) == []
    assert api.subscribe(channel["id"], ALL_QUEUE_TOPICS[:1]).status_code == 200


def test_rest_requests_are_recorded_with_their_answer_and_arrival_time(api: Api, sim: Simulator) -> None:
    sim.notifications.fail_next("create_channel", 503)
    api.call("POST", "/api/v2/notifications/channels")
    channel = api.channel()
    api.head(channel["id"])
    recorded = sim.notifications.requests()
    assert [(r.endpoint, r.method, r.status) for r in recorded] == [
        ("create_channel", "POST", 503), ("create_channel", "POST", 200), ("head_channel", "HEAD", 200)]
    assert recorded[0].at <= recorded[1].at <= recorded[2].at <= time.monotonic()
    assert sim.notifications.requests("head_channel") == recorded[2:]


def test_fail_next_refuses_an_endpoint_it_does_not_know(sim: Simulator) -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        sim.notifications.fail_next("channel", 429)


# --- subscriptions ----------------------------------------------------------------------------------------


def test_put_replaces_post_adds_get_lists_and_delete_clears(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    first, second, third = ALL_QUEUE_TOPICS[:3]
    answer = api.subscribe(channel["id"], [first, second])
    assert answer.json()["entities"] == [{"id": topic, "state": "Permitted"} for topic in (first, second)]
    assert api.subscribe(channel["id"], [third], method="POST").status_code == 200
    assert api.topics(channel["id"]) == [first, second, third]
    assert api.subscribe(channel["id"], [second]).status_code == 200
    assert api.topics(channel["id"]) == [second]
    deleted = api.call("DELETE", f"/api/v2/notifications/channels/{channel['id']}/subscriptions")
    assert deleted.status_code == 204
    assert api.topics(channel["id"]) == []
    stats = sim.notifications.stats
    counts = [stats[f"subscriptions_{verb}"] for verb in ("puts", "posts", "deletes")]
    assert counts == [2, 1, 1]
    assert stats["topics_per_channel"] == {channel["id"]: 0}


def test_more_than_1000_topics_is_refused_and_changes_nothing(api: Api) -> None:
    channel = api.channel()
    topics = [detail_topic(f"c-{n}", "customer.end") for n in range(1001)]
    refused = api.subscribe(channel["id"], topics)
    assert refused.status_code == 400 and refused.json()["status"] == 400
    assert api.topics(channel["id"]) == []
    assert api.subscribe(channel["id"], topics[:1000]).status_code == 200
    assert api.subscribe(channel["id"], topics[1000:], method="POST").status_code == 400
    assert len(api.topics(channel["id"])) == 1000


def test_a_refused_topic_is_rejected_with_ignore_errors_else_fails_the_call(api: Api, sim: Simulator) -> None:
    sim.notifications.denied_topics = ["v2.detail.events.*"]
    channel = api.channel()
    allowed, denied = ALL_QUEUE_TOPICS[0], detail_topic("c-1", "wrapup")
    failed = api.subscribe(channel["id"], [allowed, denied])
    assert failed.status_code == 400 and denied in failed.json()["message"]
    assert api.topics(channel["id"]) == []

    answer = api.subscribe(channel["id"], [allowed, denied], ignore_errors=True)
    assert answer.status_code == 200
    permitted, rejected = answer.json()["entities"]
    assert permitted == {"id": allowed, "state": "Permitted"}
    assert rejected["id"] == denied and rejected["state"] == "Rejected"
    assert rejected["missingPermissions"] == ["analytics:conversationDetail:view"]
    assert api.topics(channel["id"]) == [allowed]


def test_a_subscription_body_that_is_not_a_topic_list_is_a_400(api: Api) -> None:
    channel = api.channel()
    path = f"/api/v2/notifications/channels/{channel['id']}/subscriptions"
    assert api.call("PUT", path, json={"id": "x"}).status_code == 400
    assert api.call("PUT", path, json=[{"topic": "x"}]).status_code == 400


def test_queues_are_listed_page_by_page(api: Api) -> None:
    first = api.call("GET", "/api/v2/routing/queues", params={"pageSize": 4, "pageNumber": 1}).json()
    second = api.call("GET", "/api/v2/routing/queues", params={"pageSize": 4, "pageNumber": 2}).json()
    assert (first["total"], first["pageCount"]) == (6, 2)
    assert (len(first["entities"]), len(second["entities"])) == (4, 2)
    assert first["nextUri"] == "/api/v2/routing/queues?pageSize=4&pageNumber=2" and "nextUri" not in second
    listed = {q["id"]: q["name"] for q in first["entities"] + second["entities"]}
    assert listed == {queue.id: queue.name for queue in QUEUES}
    assert api.call("GET", "/api/v2/routing/queues", params={"pageSize": 0}).status_code == 400
    one = api.call("GET", f"/api/v2/routing/queues/{QUEUES[0].id}").json()
    assert one["name"] == QUEUES[0].name
    users = api.call("GET", "/api/v2/users", params={"pageSize": 100}).json()
    assert {u["id"] for u in users["entities"]} == {agent.id for agent in AGENTS}


# --- the socket -------------------------------------------------------------------------------------------


def test_heartbeats_arrive_while_the_socket_is_idle(api: Api, sim: Simulator) -> None:
    sim.notifications.heartbeat_interval = 0.1
    with open_socket(api.channel()) as ws:
        started = time.monotonic()
        beats = [receive(ws) for _ in range(3)]
        elapsed = time.monotonic() - started
    assert beats == [{"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}}] * 3
    assert elapsed >= 0.2  # three beats, 0.1 s apart
    assert sim.notifications.stats["heartbeats_sent"] >= 3


def test_a_ping_gets_a_pong_unless_pings_go_unanswered(api: Api, sim: Simulator) -> None:
    with open_socket(api.channel()) as ws:
        ws.send(PING)
        assert receive(ws) == PONG
        sim.notifications.answer_pings = False
        ws.send(PING)
        with pytest.raises(TimeoutError):
            receive(ws, timeout=0.3)
    stats = sim.notifications.stats
    assert (stats["pings_received"], stats["pings_answered"]) == (2, 1)


def test_a_second_socket_kicks_the_first(api: Api, sim: Simulator) -> None:
    channel = api.channel()
    api.subscribe(channel["id"], ALL_QUEUE_TOPICS)
    with open_socket(channel) as first:
        assert sim.notifications.wait_for_sockets(1)
        with open_socket(channel) as second:
            _, closed = until_closed(first)
            assert closed.rcvd is not None and closed.rcvd.code == 1000
            assert closed.rcvd.reason == "replaced by another connection"
            sim.generate(1)
            assert events(second, 1)[0]["topicName"] in ALL_QUEUE_TOPICS
    assert sim.notifications.stats["sockets_kicked"] == 1


def test_socket_closing_handover_loses_no_message(api: Api, sim: Simulator) -> None:
    """socket_closing arrives mid-stream; the client opens a new socket on the channel (which replaces the old
    one) and reads the old one to its close: together they carry every message exactly once."""
    channel = api.channel()
    api.subscribe(channel["id"], ALL_QUEUE_TOPICS)
    payloads = Scenario(11).timeline(12)
    expected = expected_snapshots(payloads, set(ALL_QUEUE_TOPICS))

    def append_all() -> None:
        for number, payload in enumerate(payloads):
            if number == len(payloads) // 3:
                sim.notifications.socket_closing(close_after=None)
            if number == len(payloads) // 2:  # keep publishing through the handover, but not past it all
                wait_for(lambda: sim.notifications.stats["sockets_kicked"] == 1, what="the old socket kicked")
            sim.append(payload)
            time.sleep(0.001)

    with ExitStack() as sockets:
        old = sockets.enter_context(open_socket(channel))
        assert sim.notifications.wait_for_sockets(1)
        writer = threading.Thread(target=append_all)
        writer.start()
        before: list[dict[str, Any]] = []
        while (message := receive(old))["topicName"] != "v2.system.socket_closing":
            before.append(message)
        assert message["eventBody"]["channelId"] == channel["id"]
        new = sockets.enter_context(open_socket(channel))
        rest_of_old, closed = until_closed(old)
        writer.join()
        after = events(new, sum(expected.values()) - len(before) - len(rest_of_old))
        assert sent_so_far(new) == []
    assert closed.rcvd is not None and closed.rcvd.code == 1000
    received = Counter(snapshot_key(m["topicName"], m["eventBody"]) for m in before + rest_of_old + after)
    assert received == expected
    assert before and after  # the handover happened mid-stream


def test_socket_closing_is_followed_by_a_1001_close(api: Api, sim: Simulator) -> None:
    with open_socket(api.channel()) as ws:
        assert sim.notifications.wait_for_sockets(1)
        assert sim.notifications.socket_closing(close_after=0.2) == 1
        started = time.monotonic()
        messages, closed = until_closed(ws)
    assert [m["topicName"] for m in messages] == ["v2.system.socket_closing"]
    assert closed.rcvd is not None and closed.rcvd.code == 1001
    assert time.monotonic() - started >= 0.15


def test_the_server_can_close_with_1001_or_drop_the_connection(api: Api, sim: Simulator) -> None:
    closing, dropping = api.channel(), api.channel()
    with open_socket(closing) as closed_ws, open_socket(dropping) as dropped_ws:
        assert sim.notifications.wait_for_sockets(2)
        sim.notifications.close_socket(closing["id"])
        sim.notifications.drop_socket(dropping["id"])
        _, closed = until_closed(closed_ws)
        _, dropped = until_closed(dropped_ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1001
    assert isinstance(dropped, ConnectionClosedError) and dropped.rcvd is None


def test_a_silent_client_is_closed_as_idle_with_1001(api: Api, sim: Simulator) -> None:
    sim.notifications.idle_timeout = 0.3
    with open_socket(api.channel()) as ws:
        started = time.monotonic()
        _, closed = until_closed(ws)
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (1001, "idle")
    assert time.monotonic() - started >= 0.25


def test_a_stalled_socket_stays_open_and_sends_nothing(api: Api, sim: Simulator) -> None:
    sim.notifications.heartbeat_interval = 0.05
    channel = api.channel()
    api.subscribe(channel["id"], ALL_QUEUE_TOPICS)
    with open_socket(channel) as ws:
        assert receive(ws)["eventBody"]["message"] == "WebSocket Heartbeat"
        sim.notifications.stall_socket()
        time.sleep(0.1)  # let the stall overtake the heartbeats already on their way
        while True:
            try:
                receive(ws, timeout=0.1)
            except TimeoutError:
                break
        ws.send(PING)
        sim.generate(1)
        with pytest.raises(TimeoutError):
            receive(ws, timeout=0.4)
        assert sim.notifications.stats["open_sockets"] == {channel["id"]: 1}


def test_a_revoked_token_ends_the_channel_and_the_token(
    api: Api, sim: Simulator, server: SimulatorServer
) -> None:
    channel = api.channel()
    with open_socket(channel) as ws:
        assert sim.notifications.wait_for_sockets(1)
        assert sim.notifications.revoke_token(channel["id"]) == 1
        messages, closed = until_closed(ws)
    assert [m["topicName"] for m in messages] == [f"v2.system.token_revoked.{channel['id']}"]
    assert messages[0]["eventBody"]["systemTopicType"] == "token_revoked"
    assert closed.rcvd is not None and closed.rcvd.reason == "token revoked"
    assert api.call("POST", "/api/v2/notifications/channels").status_code == 401
    fresh = Api(api.url, get_token(server))
    assert fresh.head(channel["id"]) == 404


# --- what the socket carries -----------------------------------------------------------------------------


def test_messages_reach_only_the_channels_subscribed_to_their_topics(api: Api, sim: Simulator) -> None:
    payloads = lifecycle_with(lambda ps: len(agents_of(ps[-1])) == 1 and ps[0]["mediaType"] == "voice")
    queue_id, user_id = payloads[-1]["queueId"], agents_of(payloads[-1])[0]["userId"]
    by_queue, by_user, elsewhere = api.channel(), api.channel(), api.channel()
    api.subscribe(by_queue["id"], [queue_topic(queue_id)])
    api.subscribe(by_user["id"], [user_topic(user_id), queue_topic(queue_id)])
    api.subscribe(elsewhere["id"], [queue_topic(q.id) for q in QUEUES if q.id != queue_id])
    with open_socket(by_queue) as q_ws, open_socket(by_user) as u_ws, open_socket(elsewhere) as e_ws:
        assert sim.notifications.wait_for_sockets(3)
        for payload in payloads:
            sim.append(payload)
        queue_messages, user_messages, other = sent_so_far(q_ws), sent_so_far(u_ws), sent_so_far(e_ws)
    assert {m["topicName"] for m in queue_messages} == {queue_topic(queue_id)}
    # Once an agent joined, each snapshot arrives once per matching topic: queue topic and user topic.
    assert Counter(m["topicName"] for m in user_messages)[user_topic(user_id)] == len(payloads) - 1
    assert other == []
    assert all(m["version"] == "2" and m["metadata"]["CorrelationId"] for m in queue_messages)


def test_a_lifecycle_becomes_detail_events_with_the_sse_times(api: Api, sim: Simulator) -> None:
    def rejected_answered_transferred(ps: list[dict[str, Any]]) -> bool:
        return (ps[0]["mediaType"], ps[0]["direction"], len(agents_of(ps[-1]))) == ("voice", "inbound", 3)

    payloads = lifecycle_with(rejected_answered_transferred)
    conversation = payloads[0]["conversationId"]
    channel = api.channel()
    api.subscribe(channel["id"], [detail_topic(conversation, kind) for kind in DETAIL_KINDS])
    with open_socket(channel) as ws:
        assert sim.notifications.wait_for_sockets(1)
        for payload in payloads:
            sim.append(payload)
        received = sent_so_far(ws)
    kinds = [m["topicName"].removeprefix(f"v2.detail.events.conversation.{conversation}.") for m in received]
    assert Counter(kinds) == Counter(
        {"customer.start": 1, "acd.start": 1, "acd.end": 1, "user.start": 2, "user.end": 3, "customer.end": 1,
         "acw": 1, "wrapup": 1}
    )
    bodies = {kind: m["eventBody"] for kind, m in zip(kinds, received, strict=True)}
    start, end, wrapup = (ms(p["timestamp"]) for p in (payloads[0], payloads[-2], payloads[-1]))
    assert bodies["customer.start"]["eventTime"] == start and bodies["customer.end"]["eventTime"] == end
    assert bodies["wrapup"]["eventTime"] == wrapup
    assert bodies["wrapup"]["wrapupCode"] == payloads[-1]["wrapup"]["code"]
    assert bodies["wrapup"]["wrapupDurationMs"] == wrapup - end
    assert {b["mediaType"] for b in bodies.values()} == {"VOICE"}
    assert {b["direction"] for b in bodies.values()} == {"INBOUND"}
    assert {(b["ani"], b["dnis"]) for b in bodies.values()} == {(payloads[0]["ani"], payloads[0]["dnis"])}
    user_ends = sorted((m["eventBody"] for k, m in zip(kinds, received, strict=True) if k == "user.end"),
                       key=lambda b: b["eventTime"])
    # rejected, transferred, ended with the conversation
    assert [b["disconnectType"] for b in user_ends] == ["ENDPOINT", "TRANSFER", "PEER"]
    assert user_ends[1]["eventTime"] < end  # a user.end that is not the end of the conversation


def test_a_duplicate_payload_repeats_the_snapshot_but_no_detail_event(api: Api, sim: Simulator) -> None:
    payloads = Scenario(5).lifecycle()
    conversation = payloads[0]["conversationId"]
    channel = api.channel()
    api.subscribe(channel["id"], [*ALL_QUEUE_TOPICS, detail_topic(conversation, "customer.end")])
    with open_socket(channel) as ws:
        assert sim.notifications.wait_for_sockets(1)
        for payload in [*payloads[:-1], payloads[-2]]:  # the end payload twice
            sim.append(payload)
        received = sent_so_far(ws)
    topics = Counter(m["topicName"] for m in received)
    assert topics[detail_topic(conversation, "customer.end")] == 1
    assert sum(n for topic, n in topics.items() if topic in ALL_QUEUE_TOPICS) >= len(payloads)


def test_while_paused_nothing_is_delivered_and_the_gap_stays_a_gap(
    api: Api, sim: Simulator, server: SimulatorServer
) -> None:
    payloads = Scenario(5).lifecycle()
    conversation = payloads[0]["conversationId"]
    channel = api.channel()
    api.subscribe(channel["id"], [*ALL_QUEUE_TOPICS, *(detail_topic(conversation, k) for k in DETAIL_KINDS)])
    with open_socket(channel) as ws:
        assert sim.notifications.wait_for_sockets(1)
        sim.notifications.paused = True
        for payload in payloads[:2]:
            sim.append(payload)
        assert sent_so_far(ws) == []
        sim.notifications.paused = False
        for payload in payloads[2:]:
            sim.append(payload)
        received = sent_so_far(ws)
    assert sim.notifications.stats["lost_while_paused"] > 0
    kinds = {kind_of(m["topicName"]) for m in received if m["topicName"].startswith("v2.detail.")}
    # The starts were lost with the gap, never sent late.
    assert kinds == {"user.end", "customer.end", "acw", "wrapup"}
    token = get_token(server)
    with open_stream(server, token) as response:
        sse = [event for _, event in read_events(response, len(payloads))]
    assert sse == payloads  # the SSE log has it all


# --- one story, two sources ------------------------------------------------------------------------------


def test_sse_and_notifications_end_in_the_same_state(
    api: Api, sim: Simulator, server: SimulatorServer
) -> None:
    sim.scenario.reject_rate = 0.3
    payloads = sim.scenario.timeline(15)
    conversations = sorted({p["conversationId"] for p in payloads})
    channel = api.channel()
    details = [detail_topic(c, kind) for c in conversations for kind in DETAIL_KINDS]
    assert api.subscribe(channel["id"], [*ALL_QUEUE_TOPICS, *details]).status_code == 200
    with open_socket(channel) as ws:
        assert sim.notifications.wait_for_sockets(1)
        for payload in payloads:
            sim.append(payload)
        received = sent_so_far(ws)
    with open_stream(server, get_token(server)) as response:
        sse = [event for _, event in read_events(response, len(payloads))]

    from_sse = fold_sse(sse)
    from_snapshots = fold_snapshots([m["eventBody"] for m in received if m["topicName"] in ALL_QUEUE_TOPICS])
    from_details = fold_details([m for m in received if m["topicName"].startswith("v2.detail.")])
    assert set(from_sse) == set(conversations)
    assert from_snapshots == from_sse
    unnamed = {c: {k: v for k, v in state.items() if k != "agent_name"} for c, state in from_sse.items()}
    assert from_details == unnamed
    assert any(len(agents_of(p)) > 1 for p in sse)  # transfers and rejections were part of the story


def ms(iso_time: str) -> int:
    return round(datetime.fromisoformat(iso_time).timestamp() * 1000)


def fold_sse(payloads: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The state the SSE stream states: times from the event types, the rest from the latest payload."""
    state: dict[str, dict[str, Any]] = {}
    for payload in sorted(payloads, key=lambda p: p["timestamp"]):
        row = state.setdefault(payload["conversationId"], {})
        kind = payload["eventType"].removeprefix("conversation:")
        at = ms(payload["timestamp"])
        if kind in ("start", "end", "wrapup"):
            row[{"start": "started", "end": "ended", "wrapup": "wrapped"}[kind]] = at
        answered = [p for p in agents_of(payload) if p.get("connectedTime")]
        agent = max(answered, key=lambda p: p["connectedTime"], default=None)
        row.update(
            queue=payload["queueId"], media=payload["mediaType"], direction=payload["direction"],
            ani=payload.get("ani"), dnis=payload.get("dnis"),
            agent=agent and agent["userId"], agent_name=agent and agent["name"],
        )
        if "wrapup" in payload:
            row.update(code=payload["wrapup"]["code"], notes=payload["wrapup"]["notes"] or None)
    return state


MEDIA_OF_LIST = {"calls": "voice", "chats": "chat", "callbacks": "callback"}


def fold_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The same state read off conversation snapshots (the rules a Notifications normalizer follows)."""
    state: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:  # one socket delivers in publish order
        row = state.setdefault(snapshot["id"], {})
        parts = snapshot["participants"]
        customer = next(p for p in parts if p["purpose"] == "customer")
        row["started"] = min(ms(p["connectedTime"]) for p in parts if p.get("connectedTime"))
        if customer.get("endTime"):
            row["ended"] = ms(customer["endTime"])
        row.update(snapshot_who_and_how(parts, customer))
        wrapped = next((p for p in parts if p.get("wrapup")), None)
        if wrapped is not None:
            wrapup = wrapped["wrapup"]
            row.update(wrapped=ms(wrapup["endTime"]), code=wrapup["code"], notes=wrapup["notes"] or None)
            assert wrapped["endAcwTime"] == wrapup["endTime"]
    return state


def snapshot_who_and_how(parts: list[dict[str, Any]], customer: dict[str, Any]) -> dict[str, Any]:
    """Queue, media, direction, numbers and agent of one snapshot."""
    answered = [p for p in parts if p["purpose"] == "agent" and p.get("connectedTime")]
    agent = max(answered, key=lambda p: p["connectedTime"], default=None)
    acd = next((p for p in parts if p["purpose"] == "acd"), None)
    media = next(key for key in MEDIA_OF_LIST if key in customer)
    direction = customer[media][0].get("direction", "inbound")  # chats carry none: they are inbound
    org_number = next((p.get("address") for p in parts if p["purpose"] != "customer"), None)
    caller, called = customer.get("address"), org_number
    if direction == "outbound":
        caller, called = called, caller
    return {
        "queue": (agent or acd or {}).get("queueId"),
        "media": MEDIA_OF_LIST[media],
        "direction": direction,
        "ani": caller,
        "dnis": called,
        "agent": agent and agent["userId"],
        "agent_name": agent and agent["name"],
    }


def fold_details(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The same state read off detail events (they name no one: no agent_name)."""
    state: dict[str, dict[str, Any]] = {}
    for message in sorted(messages, key=lambda m: m["eventBody"]["eventTime"]):
        body, kind = message["eventBody"], kind_of(message["topicName"])
        row = state.setdefault(body["conversationId"], {"agent": None})
        row.update(media=body["mediaType"].lower(), direction=body["direction"].lower(),
                   ani=body.get("ani"), dnis=body.get("dnis"))
        if kind == "customer.start":
            row["started"] = body["eventTime"]
        elif kind == "customer.end":
            row["ended"] = body["eventTime"]
        elif kind == "wrapup":
            row.update(wrapped=body["eventTime"], code=body["wrapupCode"], notes=body.get("wrapupNotes"))
        elif kind == "acd.start":
            row["queue"] = body["queueId"]
        elif kind == "user.start":  # the agent who connected last holds the conversation
            row.update(queue=body["queueId"], agent=body["userId"])
    return state


def kind_of(topic: str) -> str:
    """v2.detail.events.conversation.{id}.customer.start -> customer.start"""
    parts = topic.split(".")
    return ".".join(parts[-2:]) if parts[-1] in ("start", "end") else parts[-1]
