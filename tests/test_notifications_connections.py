"""Connection history: what the sources report about each connection, and the StreamConnection rows written."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from conversations.connections import ConnectionRecorder, record_connection
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.notifications import ConnectionReport, ConnectionTracker
from conversations.genesys.simulator import Simulator, SimulatorServer
from conversations.genesys.sse import SSESource
from conversations.models import StreamConnection

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def test_a_connection_is_reported_when_it_opens_every_interval_while_it_lives_and_when_it_ends() -> None:
    clock, reports = Clock(), []
    tracker = ConnectionTracker(source="notifications", listener=reports.append, channel_id="ch-1",
                                report_interval=5, now=clock)
    assert [r.connected_at for r in reports] == [T0] and reports[0].channel_id == "ch-1"
    clock.tick(1)
    tracker.heartbeat()
    tracker.events(3)
    assert len(reports) == 1  # not yet: at most one report per interval while the connection lives
    clock.tick(5)
    tracker.events()
    assert len(reports) == 2
    assert (reports[-1].events_received, reports[-1].last_event_at, reports[-1].last_heartbeat_at) == (
        4, T0 + timedelta(seconds=6), T0 + timedelta(seconds=1))
    clock.tick(1)
    tracker.close("dropped (no close frame)")
    tracker.close("worker stopping")  # only the first reason counts
    tracker.heartbeat()
    assert len(reports) == 3 and reports[-1].disconnect_reason == "dropped (no close frame)"
    assert reports[-1].disconnected_at == T0 + timedelta(seconds=7) and reports[-1].events_received == 4


@pytest.mark.django_db
def test_each_report_upserts_its_connections_row() -> None:
    report = ConnectionReport(source="notifications", connection_id="abc", channel_id="ch-1", connected_at=T0)
    record_connection(report=report, worker="host:1")
    later = ConnectionReport(source="notifications", connection_id="abc", channel_id="ch-1", connected_at=T0,
                             events_received=7, last_event_at=T0, disconnected_at=T0 + timedelta(seconds=9),
                             disconnect_reason="closed by the server (code 1001)")
    record_connection(report=later, worker="host:1")
    row = StreamConnection.objects.get()
    assert (row.connection_id, row.worker, row.events_received, row.disconnect_reason) == (
        "abc", "host:1", 7, "closed by the server (code 1001)")


@pytest.mark.django_db(transaction=True)
def test_the_recorder_writes_the_newest_report_of_each_connection_and_closes_what_was_left_open() -> None:
    recorder = ConnectionRecorder(worker="host:2", flush_interval=0.01)
    with recorder.running():
        recorder(ConnectionReport(source="sse", connection_id="a", channel_id="", connected_at=T0))
        recorder(ConnectionReport(source="sse", connection_id="a", channel_id="", connected_at=T0,
                                  events_received=5))
        recorder(ConnectionReport(source="sse", connection_id="b", channel_id="", connected_at=T0,
                                  disconnected_at=T0, disconnect_reason="the server ended the stream"))
        deadline = time.monotonic() + 5
        while StreamConnection.objects.count() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    rows = {row.connection_id: row for row in StreamConnection.objects.all()}
    assert rows["a"].events_received == 5 and rows["a"].disconnect_reason == "worker stopped"
    assert rows["b"].disconnect_reason == "the server ended the stream"


# --- the SSE source reports its connections too --------------------------------------------------------------


@pytest.fixture
def sim() -> Simulator:
    return Simulator(client_id="sim-client", client_secret="sim-secret", seed=7, keepalive_interval=0.05)


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as running:
        yield running


def test_the_sse_source_reports_each_stream_and_why_it_ended(sim: Simulator, server: SimulatorServer) -> None:
    reports: list[ConnectionReport] = []
    tokens = TokenProvider(login_url=server.url, client_id="sim-client", client_secret="sim-secret")
    source = SSESource(api_url=server.url, tokens=tokens, stop=threading.Event(), read_timeout=5,
                       backoff=Backoff(base=0.01, cap=0.05), on_connection=reports.append)
    payloads = sim.generate(conversations=2)
    sim.drop_after(3)
    received = []
    for message in source.messages():
        received.append(message)
        if len(received) == len(payloads):
            break
    source.close()
    connections = list(dict.fromkeys(r.connection_id for r in reports))
    assert len(connections) == 2 and all(r.source == "sse" and r.channel_id == "" for r in reports)
    first = [r for r in reports if r.connection_id == connections[0]][-1]
    assert "the stream broke" in first.disconnect_reason or "ended the stream" in first.disconnect_reason
    assert first.events_received == 3 and first.last_heartbeat_at is not None
    last = [r for r in reports if r.connection_id == connections[1]][-1]
    assert last.disconnect_reason == "stopped" and last.events_received == len(payloads) - 3
