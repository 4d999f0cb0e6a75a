"""Finding the gaps of a source's connection history: start-up after downtime (a clean stop or a SIGKILL), a
reconnect, a new channel after an eviction, a socket_closing handover (no gap), several channels at once."""
from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conversations.backfill import (
    GapFiller,
    Span,
    clip,
    connection_gaps,
    find_gaps,
    merge_windows,
    span_of_row,
)
from conversations.models import StreamConnection

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def span(cid: str, start: float, end: float | None, *, channel: str = "ch-1", run: str = "host:1") -> Span:
    return Span(cid, channel, run, at(start), None if end is None else at(end), reason=f"{cid} ended")


def windows(gaps: list) -> list[tuple[float, float, str | None]]:
    return [((g.start - T0).total_seconds(), (g.end - T0).total_seconds(), g.closed_by) for g in gaps]


def test_a_reconnect_on_the_same_channel_is_a_gap_from_the_disconnect_to_the_connect() -> None:
    gaps = find_gaps([span("a", 0, 100), span("b", 103, None)])
    assert windows(gaps) == [(100, 103, "b")] and gaps[0].kind == "reconnect" and gaps[0].cause == "a ended"


def test_a_socket_that_went_silent_before_it_was_dropped_has_a_gap_from_its_last_sign_of_life() -> None:
    stalled = Span("a", "ch-1", "host:1", at(0), at(180), "idle: no message for 70s", last_seen=at(100))
    assert windows(find_gaps([stalled, span("b", 181, None)])) == [(100, 181, "b")]


def test_a_socket_replaced_while_the_old_one_still_delivered_is_no_gap() -> None:
    # socket_closing: the new socket first, then the old one drained and closed
    assert find_gaps([span("a", 0, 105), span("b", 100, None)]) == []


def test_a_new_channel_after_an_eviction_closes_the_gap_the_evicted_channel_left() -> None:
    gaps = find_gaps([span("a", 0, 100, channel="ch-1"), span("b", 101, None, channel="ch-2")])
    assert windows(gaps) == [(100, 101, "b")] and gaps[0].kind == "new channel"


def test_start_up_after_a_clean_stop_is_one_downtime_gap_from_the_last_disconnect() -> None:
    before = [span("a", 0, 50, run="host:1"), span("b", 51, 600, run="host:1")]
    gaps = find_gaps([*before, span("c", 900, None, channel="ch-9", run="host:2")])
    assert windows(gaps) == [(50, 51, "b"), (600, 900, "c")] and gaps[1].kind == "downtime"


def test_a_killed_worker_is_last_known_alive_at_its_last_heartbeat_or_event(db: None) -> None:
    killed = StreamConnection.objects.create(
        source="notifications", worker="host:1", channel_id="ch-1", connection_id="a", connected_at=at(0),
        last_heartbeat_at=at(290), last_event_at=at(300),
    )
    assert span_of_row(killed).ended_at == at(300)
    assert span_of_row(killed, alive_after=at(250)).ended_at is None  # recent: it may still be delivering
    gaps = find_gaps([span_of_row(killed), span("b", 400, None, channel="ch-2", run="host:2")])
    assert windows(gaps) == [(300, 400, "b")]


def test_every_channel_a_previous_run_left_open_starts_the_downtime_gap() -> None:
    before = [span("a", 0, 300, channel="ch-1"), span("b", 0, 200, channel="ch-2")]  # ch-2 died first
    after = [span("c", 500, None, channel="ch-3", run="host:2"),
             span("d", 501, None, channel="ch-4", run="host:2")]
    assert windows(find_gaps([*before, *after])) == [(200, 500, "c")]


def test_with_two_channels_one_dropping_is_a_gap_though_the_other_kept_delivering() -> None:
    spans = [span("a", 0, None, channel="ch-1"), span("b", 0, 100, channel="ch-2"), span("c", 104, None,
                                                                                      channel="ch-2")]
    assert windows(find_gaps(spans)) == [(100, 104, "c")]


def test_a_source_still_down_has_a_gap_until_now() -> None:
    gaps = find_gaps([span("a", 0, 100)], now=at(160))
    assert windows(gaps) == [(100, 160, None)] and gaps[0].kind == "down now"


def test_a_channel_added_while_connected_is_no_gap() -> None:
    assert find_gaps([span("a", 0, None, channel="ch-1"), span("b", 50, None, channel="ch-2")]) == []


@pytest.mark.django_db
def test_the_gaps_of_a_window_are_read_from_the_connection_history() -> None:
    rows = [("a", 0, 100, "host:1"), ("b", 130, 400, "host:1"), ("c", 1000, None, "host:2")]
    for cid, start, end, worker in rows:
        StreamConnection.objects.create(
            source="notifications", worker=worker, channel_id=cid, connection_id=cid, connected_at=at(start),
            disconnected_at=end and at(end), last_heartbeat_at=at(end or start),
        )
    StreamConnection.objects.create(source="sse", connection_id="x", connected_at=at(0),
                                    disconnected_at=at(1))
    gaps = connection_gaps(source="notifications", since=at(300), until=at(2000))
    # "c" never said it ended and has been silent since: the source is down from then until the window's end.
    assert windows(gaps) == [(400, 1000, "c"), (1000, 2000, None)]


def test_windows_are_merged_and_clipped() -> None:
    merged = merge_windows([(at(10), at(20)), (at(0), at(12)), (at(30), at(40))])
    assert merged == [(at(0), at(20)), (at(30), at(40))]
    assert clip((at(0), at(100)), longest=timedelta(seconds=30), now=at(80)) == (at(50), at(80))


def test_the_worker_fills_the_gaps_of_the_notifications_source_only_and_when_asked(settings: Any) -> None:
    stop = threading.Event()

    def listener(report: object) -> None:
        return None

    assert GapFiller.for_worker("notifications", stop=stop).tee(listener) is not listener
    assert GapFiller.for_worker("sse", stop=stop).tee(listener) is listener  # SSE resumes with Last-Event-ID
    settings.GENESYS_BACKFILL_ON_GAP = False
    assert GapFiller.for_worker("notifications", stop=stop).tee(listener) is listener
