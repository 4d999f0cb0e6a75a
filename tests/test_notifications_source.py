"""The Notifications source over real loopback HTTP and WebSocket against the simulator: channels, subscriptions,
topic limits, heartbeats and idle detection, socket_closing handover, drops, expiry, eviction, token revocation.
No database: the source yields typed events; what the worker does with them is tested elsewhere."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from conversations.events import EventKind, Reject, TypedEvent
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import FatalSourceError
from conversations.genesys.notifications import (
    CatalogNames,
    ConnectionReport,
    NotificationsApi,
    NotificationsConfig,
    NotificationsSource,
)
from conversations.genesys.scenario import AGENTS, QUEUES
from conversations.genesys.simulator import Simulator, SimulatorServer
from conversations.genesys.simulator_notifications import (
    RestRequest,
    conversation_snapshot,
    message_text,
    queue_topic,
)
from conversations.genesys.topics import detail_topics
from conversations.normalize_notifications import normalize_notification

from tests.factories import wait_for

DAY = 24 * 3600.0
QUEUE_TOPICS = sorted(queue_topic(q.id) for q in QUEUES)
# Quick to act, slow to give up: a pong or a socket's opening may take seconds on a loaded machine, and giving
# up early would reconnect where no test expects it.
FAST = NotificationsConfig(
    idle_timeout=2.0, pong_timeout=10.0, sync_interval=0.02, prune_interval=0.0, stable_after=0.0,
    handover_grace=2.0, report_interval=0.0, open_timeout=30.0, ended_grace=60.0,
)
# A generous deadline for what normally takes milliseconds: a passing test never waits it out.
WAIT = 30.0

# Retries within 0.05 s: only a Retry-After the source honours can space them further apart.
QUICK_BACKOFF = lambda: Backoff(base=0.01, cap=0.05)  # noqa: E731
# The same, but with room under its cap for a Retry-After of a few seconds.
ROOMY_BACKOFF = lambda: Backoff(base=0.01, cap=5.0)  # noqa: E731


@pytest.fixture
def sim() -> Simulator:
    simulator = Simulator(client_id="sim-client", client_secret="sim-secret", seed=7)
    simulator.notifications.heartbeat_interval = 0.1
    return simulator


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as running:
        yield running



@dataclass
class Running:
    """A source reading in its own thread, as the pipeline's reader runs it."""

    source: NotificationsSource
    sim: Simulator
    items: list[TypedEvent | Reject] = field(default_factory=list)
    reports: list[ConnectionReport] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def consume(self) -> None:
        try:
            for item in self.source.events():
                self.items.append(item)
        except BaseException as exc:  # the test asserts on it
            self.errors.append(exc)

    @property
    def events(self) -> list[TypedEvent]:
        return [i for i in list(self.items) if isinstance(i, TypedEvent)]

    @property
    def hub_stats(self) -> dict[str, Any]:
        return self.sim.notifications.stats

    def channel(self) -> str:
        """The newest live channel, once a socket is open on it."""
        hub = self.sim.notifications

        def open_channel() -> str | None:
            ids = hub.channel_ids()
            return ids[-1] if ids and hub.stats["open_sockets"].get(ids[-1]) else None

        return str(wait_for(open_channel, what="a channel with an open socket"))

    def subscribed(self, channel_id: str) -> list[str]:
        return sorted(self.sim.notifications.topics(channel_id))

    def closed_reports(self) -> list[ConnectionReport]:
        return [r for r in list(self.reports) if r.disconnected_at is not None]

    def stop(self) -> None:
        self.source.close()
        if self.thread is not None:
            self.thread.join(timeout=10)


@pytest.fixture
def start(sim: Simulator, server: SimulatorServer) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start_source(config: NotificationsConfig = FAST, *, client_secret: str = "sim-secret",
                     ready: bool = True, backoff: Callable[[], Backoff] = QUICK_BACKOFF) -> Running:
        tokens = TokenProvider(login_url=server.url, client_id="sim-client", client_secret=client_secret)
        run = Running(source=None, sim=sim)  # type: ignore[arg-type]
        run.source = NotificationsSource(
            api=NotificationsApi(api_url=server.url, tokens=tokens), config=config,
            backoff=backoff, clock=sim.notifications.now,
            on_connection=run.reports.append,
        )
        run.thread = threading.Thread(target=run.consume, daemon=True)
        run.thread.start()
        running.append(run)
        if ready:
            assert run.source.wait_ready(WAIT)
            run.channel()
        return run

    yield start_source
    for run in running:
        run.stop()


def feed(sim: Simulator, conversations: int, *, pause: float = 0.01) -> list[dict[str, Any]]:
    """Append lifecycles one payload at a time, as a live org would: detail topics get time to be subscribed."""
    payloads = sim.scenario.timeline(conversations)
    for payload in payloads:
        sim.append(payload)
        time.sleep(pause)
    return payloads


def snapshot_keys(payloads: list[dict[str, Any]]) -> set[str]:
    """The dedupe key of every snapshot the simulator publishes for these payloads."""
    keys = set()
    for payload in payloads:
        snapshot = conversation_snapshot(payload)
        if any(p.get("queueId") for p in snapshot["participants"]):  # published on a queue topic
            [event] = normalize_notification(message_text(QUEUE_TOPICS[0], snapshot))
            assert isinstance(event, TypedEvent)
            keys.add(event.dedupe_key)
    return keys


def received_keys(run: Running) -> set[str]:
    return {e.dedupe_key for e in run.events if e.event_type == "conversation.snapshot"}


# --- REST: channels, subscriptions, queues ---------------------------------------------------------------------


def test_every_queue_is_watched_on_one_channel_and_conversations_arrive_as_typed_events(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start()
    channel = run.channel()
    assert run.subscribed(channel) == QUEUE_TOPICS
    payloads = feed(sim, 4)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="every snapshot")
    kinds = {e.kind for e in run.events}
    assert {EventKind.START, EventKind.UPDATE, EventKind.END, EventKind.WRAPUP} <= kinds
    assert any(e.event_type.startswith("detail.") for e in run.events), "detail events of followed conversations"
    assert run.source.stats.channels_created == 1 and run.source.stats.reconnects == 0
    assert not run.errors


def test_detail_topics_are_added_when_a_conversation_is_discovered_and_dropped_once_it_is_wrapped_up(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start()
    channel = run.channel()
    script = sim.scenario.script()
    sim.append(script.next_event(sim.notifications.now()))  # start: the conversation waits in the queue
    topics = set(detail_topics(script.conversation_id))
    wait_for(lambda: topics <= set(run.subscribed(channel)), what="the conversation's detail topics")
    while not script.done:
        time.sleep(0.05)
        sim.append(script.next_event(sim.notifications.now()))
    wait_for(lambda: run.subscribed(channel) == QUEUE_TOPICS, what="the detail topics to go")
    details = {e.event_type for e in run.events if e.conversation_id == script.conversation_id}
    assert {"detail.user.start", "detail.customer.end", "detail.acw"} <= details


def test_queue_ids_narrow_the_queues_and_user_ids_add_user_topics(
    start: Callable[..., Running],
) -> None:
    queue_ids = (QUEUES[0].id, QUEUES[1].id)
    run = start(replace(FAST, queue_ids=queue_ids, user_ids=(AGENTS[0].id,)))
    assert run.subscribed(run.channel()) == sorted(
        [queue_topic(q) for q in queue_ids] + [f"v2.users.{AGENTS[0].id}.conversations"])


def test_the_queue_listing_is_read_page_by_page(start: Callable[..., Running], sim: Simulator) -> None:
    sim.notifications.queues.extend({"id": f"extra-{n:03d}", "name": f"Extra {n}"} for n in range(150))
    run = start()
    assert len(run.subscribed(run.channel())) == 156
    assert sim.notifications.stats["queue_requests"] == 2  # pages of 100
    assert run.source.names.queue_name("extra-149") == "Extra 149"


def test_a_rejected_topic_is_logged_with_its_missing_permissions_and_the_rest_is_watched(
    start: Callable[..., Running], sim: Simulator, caplog: pytest.LogCaptureFixture,
) -> None:
    denied = queue_topic(QUEUES[2].id)
    sim.notifications.denied_topics = [denied]
    with caplog.at_level(logging.WARNING, logger="conversations.genesys.notifications"):
        run = start()
        channel = run.channel()
    assert run.subscribed(channel) == [t for t in QUEUE_TOPICS if t != denied]
    line = next(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())
    assert denied in line and "missing permissions: " in line and "none listed" not in line
    assert run.source.stats.rejected_topics == 1


def test_an_oauth_client_whose_every_topic_is_rejected_stops_with_a_fatal_error(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    sim.notifications.denied_topics = ["v2.routing.queues.*"]
    run = start(ready=False)
    wait_for(lambda: run.errors, what="the source to fail")
    assert isinstance(run.errors[0], FatalSourceError) and "rejected every queue and user topic" in str(run.errors[0])


def test_refused_detail_topics_leave_conversations_to_their_snapshots(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    sim.notifications.denied_topics = ["v2.detail.events.*"]
    run = start()
    payloads = feed(sim, 3)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="every snapshot")
    assert run.source.budget is not None and not run.source.budget.details_enabled
    assert not run.errors and run.source.stats.reconnects == 0


def gaps(requests_made: list[RestRequest]) -> list[float]:
    """Seconds between one request's arrival and the next's, as the simulator recorded them."""
    return [later.at - earlier.at for earlier, later in zip(requests_made, requests_made[1:], strict=False)]


def test_a_429_on_channel_creation_is_retried_only_after_its_retry_after(
    start: Callable[..., Running], sim: Simulator, caplog: pytest.LogCaptureFixture,
) -> None:
    sim.notifications.fail_next("create_channel", 429, count=2, retry_after=1)
    with caplog.at_level(logging.WARNING, logger="conversations.genesys.notifications"):
        run = start(backoff=ROOMY_BACKOFF)
    attempts = sim.notifications.requests("create_channel")
    assert [a.status for a in attempts] == [429, 429, 200]
    assert all(gap >= 0.95 for gap in gaps(attempts)), gaps(attempts)
    waits = [r.getMessage() for r in caplog.records if "Retry-After" in r.getMessage()]
    assert len(waits) == 2 and all("asked to wait 1s (Retry-After)" in line for line in waits)
    payloads = feed(sim, 1)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="events once connected")
    assert run.source.stats.channels_created == 1 and not run.errors


def test_a_429_on_subscribing_a_new_channel_is_retried_only_after_its_retry_after(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    sim.notifications.fail_next("subscriptions", 429, retry_after=1)
    run = start(backoff=ROOMY_BACKOFF)
    puts = sim.notifications.requests("subscriptions")
    assert [(p.method, p.status) for p in puts] == [("PUT", 429), ("PUT", 200)]
    assert gaps(puts)[0] >= 0.95
    assert run.subscribed(run.channel()) == QUEUE_TOPICS and run.source.stats.channels_created == 1
    payloads = feed(sim, 1)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="events once subscribed")


def test_a_429_on_adding_detail_topics_is_retried_only_after_its_retry_after(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start(backoff=ROOMY_BACKOFF)
    channel = run.channel()
    sim.notifications.fail_next("subscriptions", 429, retry_after=1)
    script = sim.scenario.script()
    sim.append(script.next_event(sim.notifications.now()))
    topics = set(detail_topics(script.conversation_id))
    wait_for(lambda: topics <= set(run.subscribed(channel)), what="the conversation's detail topics")
    posts = [r for r in sim.notifications.requests("subscriptions") if r.method == "POST"]
    assert [p.status for p in posts][:2] == [429, 200] and gaps(posts)[0] >= 0.95


def test_a_retry_after_beyond_the_backoff_cap_is_still_waited_in_full(
    start: Callable[..., Running], sim: Simulator, caplog: pytest.LogCaptureFixture,
) -> None:
    sim.notifications.fail_next("create_channel", 429, retry_after=2)
    with caplog.at_level(logging.WARNING, logger="conversations.genesys.notifications"):
        start(backoff=lambda: Backoff(base=0.01, cap=0.5))
    attempts = sim.notifications.requests("create_channel")
    assert [a.status for a in attempts] == [429, 200]
    assert gaps(attempts)[0] >= 1.9
    assert any("asked to wait 2s (Retry-After)" in r.getMessage() for r in caplog.records)


def test_a_429_on_checking_the_channel_is_retried_only_after_its_retry_after(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start(backoff=ROOMY_BACKOFF)
    channel = run.channel()
    sim.notifications.fail_next("head_channel", 429, retry_after=1)
    sim.notifications.drop_socket()
    wait_for(lambda: sim.notifications.stats["sockets_opened"] == 2, what="a new socket")
    heads = sim.notifications.requests("head_channel")
    assert [h.status for h in heads] == [429, 200] and gaps(heads)[0] >= 0.95
    assert sim.notifications.channel_ids() == [channel]


def test_a_429_on_listing_the_queues_is_retried_only_after_its_retry_after(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    sim.notifications.fail_next("queues", 429, retry_after=1)
    run = start(backoff=ROOMY_BACKOFF)
    listings = sim.notifications.requests("queues")
    assert [q.status for q in listings] == [429, 200] and gaps(listings)[0] >= 0.95
    assert run.subscribed(run.channel()) == QUEUE_TOPICS


def test_stop_interrupts_a_retry_after_wait(start: Callable[..., Running], sim: Simulator) -> None:
    sim.notifications.fail_next("create_channel", 429, count=5, retry_after=30)
    run = start(ready=False, backoff=lambda: Backoff(base=0.01, cap=60.0))
    wait_for(lambda: sim.notifications.requests("create_channel"), what="the first channel request")
    time.sleep(0.3)  # long enough for a retry that ignored Retry-After
    started = time.monotonic()
    run.stop()
    # Far from the 30 s Retry-After, with room for a loaded machine.
    assert time.monotonic() - started < 10 and not run.thread.is_alive()  # type: ignore[union-attr]
    assert [a.status for a in sim.notifications.requests("create_channel")] == [429]
    assert not run.errors


def test_bad_credentials_are_fatal(start: Callable[..., Running]) -> None:
    run = start(client_secret="wrong", ready=False)
    wait_for(lambda: run.errors, what="the source to fail")
    assert isinstance(run.errors[0], FatalSourceError) and "sim-client" in str(run.errors[0])


def test_after_a_429_wrapup_codes_are_not_looked_up_until_its_retry_after_passes(
    server: SimulatorServer,
) -> None:
    tokens = TokenProvider(login_url=server.url, client_id="sim-client", client_secret="sim-secret")
    with Busy(retry_after=30) as busy:
        names = CatalogNames(NotificationsApi(api_url=busy.url, tokens=tokens))
        assert [names.wrapup_name(code) for code in ("code-1", "code-1", "code-2")] == [None, None, None]
    assert busy.requests == ["/api/v2/routing/wrapupcodes/code-1"]


class Busy:
    """A loopback stand-in for the API (the simulator has no failure knob for wrap-up codes): every GET is
    answered 429 with a Retry-After; the paths asked for are recorded."""

    def __init__(self, *, retry_after: int) -> None:
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _busy_handler(self.requests, retry_after))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self) -> Busy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _busy_handler(requests_seen: list[str], retry_after: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests_seen.append(self.path)
            body = b'{"message": "Rate limit exceeded", "code": "too.many.requests.retry.after"}'
            self.send_response(429)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Retry-After", str(retry_after))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            return

    return Handler


# --- topic limits ------------------------------------------------------------------------------------------


def test_topics_spread_over_channels_and_never_pass_the_limit(
    start: Callable[..., Running], sim: Simulator, caplog: pytest.LogCaptureFixture,
) -> None:
    sim.notifications.max_topics = 10  # the simulator answers 400 past it, which would be fatal
    with caplog.at_level(logging.WARNING):
        run = start(replace(FAST, max_topics=10, max_channels=3))
        scripts = [sim.scenario.script() for _ in range(4)]
        for script in scripts:  # four conversations at once, none finished: 6 + 4 x 8 topics wanted
            sim.append(script.next_event(sim.notifications.now()))
        wait_for(lambda: len(sim.notifications.channel_ids()) == 3, what="three channels")
        wait_for(lambda: run.source.budget is not None and run.source.budget.dropped_no_room >= 2,
                 what="the budget to run out of room")
    wait_for(lambda: sum(sim.notifications.stats["topics_per_channel"].values()) == 6 + 2 * 8,
             what="two conversations' detail topics on the new channels")
    assert max(sim.notifications.stats["topics_per_channel"].values()) <= 10
    assert any("no room for the detail topics" in r.getMessage() for r in caplog.records)
    assert any("3 of 3 channels in use" in r.getMessage() for r in caplog.records)
    assert not run.errors


def test_many_queues_are_spread_evenly_over_as_few_channels_as_hold_them(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    sim.notifications.queues.extend({"id": f"extra-{n:03d}", "name": f"Extra {n}"} for n in range(19))
    run = start(replace(FAST, max_topics=10, detail_types=()))
    wait_for(lambda: sum(sim.notifications.stats["open_sockets"].values()) == 3, what="three sockets")
    assert sorted(sim.notifications.stats["topics_per_channel"].values()) == [7, 9, 9]
    assert not run.errors


# --- the socket: heartbeats, idle, handover, drops -----------------------------------------------------------


def test_heartbeats_are_tracked_in_the_connection_history(start: Callable[..., Running]) -> None:
    run = start()
    wait_for(lambda: run.reports and run.reports[-1].last_heartbeat_at is not None, what="a heartbeat")
    assert run.reports[0].channel_id == run.channel()


def test_a_silent_socket_is_pinged_and_kept_when_the_pong_comes(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    sim.notifications.heartbeat_interval = None
    run = start(replace(FAST, idle_timeout=0.2))
    wait_for(lambda: sim.notifications.stats["pings_answered"] >= 2, what="two pongs")
    assert run.source.stats.reconnects == 0 and sim.notifications.stats["sockets_opened"] == 1


def test_a_socket_that_answers_no_ping_is_replaced(start: Callable[..., Running], sim: Simulator) -> None:
    run = start(replace(FAST, idle_timeout=0.2, pong_timeout=0.2))
    channel = run.channel()
    started = time.monotonic()
    sim.notifications.stall_socket()
    wait_for(lambda: run.source.stats.idle_reconnects == 1, what="the idle reconnect")
    assert time.monotonic() - started >= 0.3  # silence (less the last heartbeat's age), a ping, then no pong
    wait_for(lambda: sim.notifications.stats["sockets_opened"] == 2, what="a new socket")
    assert sim.notifications.channel_ids() == [channel]  # HEAD said the channel lives: reused
    assert "idle" in run.closed_reports()[0].disconnect_reason
    payloads = feed(sim, 1)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="events on the new socket")


def test_socket_closing_hands_over_to_a_new_socket_without_losing_a_message(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start()
    channel = run.channel()
    payloads = sim.scenario.timeline(12)
    half = len(payloads) // 2

    def publish() -> None:
        for n, payload in enumerate(payloads):
            sim.append(payload)
            if n == half:
                sim.notifications.socket_closing(close_after=None)
            time.sleep(0.002)

    publisher = threading.Thread(target=publish)
    publisher.start()
    publisher.join()
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="every snapshot")
    stats = sim.notifications.stats
    assert (stats["sockets_opened"], stats["sockets_kicked"], stats["lost_no_socket"]) == (2, 1, 0)
    assert run.source.stats.handovers == 1 and run.source.stats.reconnects == 0
    assert sim.notifications.channel_ids() == [channel]
    [old] = wait_for(run.closed_reports, what="the old socket's history")
    assert "socket_closing" in old.disconnect_reason and old.channel_id == channel


@pytest.mark.parametrize("how", ["drop", "close 1001", "close 1011"])
def test_a_lost_socket_reconnects_to_the_same_channel_while_it_lives(
    start: Callable[..., Running], sim: Simulator, how: str,
) -> None:
    run = start()
    channel = run.channel()
    if how == "drop":
        sim.notifications.drop_socket()
    else:
        sim.notifications.close_socket(code=int(how.split()[1]))
    wait_for(lambda: sim.notifications.stats["sockets_opened"] == 2, what="a new socket")
    assert sim.notifications.channel_ids() == [channel] and run.source.stats.channels_created == 1
    assert sim.notifications.stats["head_requests"] >= 1
    reason = run.closed_reports()[0].disconnect_reason
    assert ("dropped" in reason) if how == "drop" else (how.split()[1] in reason)
    payloads = feed(sim, 1)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="events on the new socket")


def test_an_expired_token_is_renewed_once_and_the_channel_kept(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start()
    channel = run.channel()
    token_requests = sim.stats["token_requests"]
    sim.expire_tokens()  # the API answers 401 until the client logs in again
    sim.notifications.drop_socket()
    wait_for(lambda: sim.notifications.stats["sockets_opened"] == 2, what="a new socket")
    assert sim.stats["token_requests"] == token_requests + 1  # HEAD got 401, a new token, then 200
    assert sim.notifications.channel_ids() == [channel] and not run.errors


# --- the channel's life: expiry, extension, eviction, revocation ------------------------------------------


def test_an_expired_channel_is_replaced_and_its_whole_topic_list_subscribed_again(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start()
    old = run.channel()
    sim.notifications.advance(DAY + 1)
    new = wait_for(lambda: run.channel() != old and run.channel(), what="a new channel")
    wait_for(lambda: run.subscribed(new) == QUEUE_TOPICS, what="the topics on the new channel")
    assert sim.notifications.stats["channels_expired"] == 1 and run.source.stats.channels_created == 2
    assert "expired" in run.closed_reports()[0].disconnect_reason
    payloads = feed(sim, 1)
    wait_for(lambda: received_keys(run) >= snapshot_keys(payloads), what="events on the new channel")


def test_a_channel_is_extended_before_its_24_hours_run_out(start: Callable[..., Running], sim: Simulator) -> None:
    run = start(replace(FAST, extend_margin=3600))
    channel = run.channel()
    puts = sim.notifications.stats["subscriptions_puts"]
    sim.notifications.advance(DAY - 1800)  # half an hour left: inside the margin
    wait_for(lambda: run.source.stats.channel_extensions == 1, what="the extension")
    assert sim.notifications.stats["subscriptions_puts"] == puts + 1
    sim.notifications.advance(3600)  # past the channel's first 24 h
    assert sim.notifications.channel_ids() == [channel] and sim.notifications.stats["channels_expired"] == 0


def test_an_evicted_channel_is_replaced_and_the_operator_told(
    start: Callable[..., Running], sim: Simulator, server: SimulatorServer, caplog: pytest.LogCaptureFixture,
) -> None:
    run = start()
    ours = run.channel()
    token = TokenProvider(login_url=server.url, client_id="sim-client", client_secret="sim-secret").token()
    with caplog.at_level(logging.WARNING):
        for _ in range(20):  # another process of the same OAuth client opens channels: the 21st evicts ours
            requests.post(f"{server.url}/api/v2/notifications/channels", timeout=WAIT,
                          headers={"Authorization": f"Bearer {token}"}).raise_for_status()
        wait_for(lambda: run.source.stats.channels_created == 2 and run.channel() != ours, what="a new channel")
    assert run.source.stats.evictions == 1 and ours not in sim.notifications.channel_ids()
    assert any("another process using the same client" in r.getMessage() for r in caplog.records)
    wait_for(lambda: run.subscribed(run.channel()) == QUEUE_TOPICS, what="the topics on the new channel")


def test_a_revoked_token_is_replaced_and_so_is_its_channel(
    start: Callable[..., Running], sim: Simulator,
) -> None:
    run = start()
    old = run.channel()
    requests_before = sim.stats["token_requests"]
    sim.notifications.revoke_token()
    new = wait_for(lambda: run.channel() != old and run.channel(), what="a new channel")
    assert run.source.stats.tokens_revoked == 1 and sim.stats["token_requests"] == requests_before + 1
    wait_for(lambda: run.subscribed(new) == QUEUE_TOPICS, what="the topics on the new channel")
    assert "token revoked" in run.closed_reports()[0].disconnect_reason


# --- stopping ----------------------------------------------------------------------------------------------


def test_stop_closes_the_socket_promptly_and_records_why(start: Callable[..., Running], sim: Simulator) -> None:
    run = start()
    started = time.monotonic()
    run.stop()
    assert time.monotonic() - started < 5 and not run.thread.is_alive()  # type: ignore[union-attr]
    assert sim.notifications.wait_for_sockets(0, timeout=WAIT)
    assert run.reports[-1].disconnect_reason == "worker stopping"
