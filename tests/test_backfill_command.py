"""`manage.py backfill`: a window (paged, split into 7-day intervals) or the gaps of a source's connection
history, fetched from the simulator's analytics details query over loopback and written by the batch writer,
hooks included."""
from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from tqdm import tqdm

from conversations.genesys.scenario import DEFAULT_START
from conversations.genesys.simulator import Simulator
from conversations.management.commands.backfill import Bar
from conversations.models import Conversation, Event, HookDelivery, StreamCheckpoint, StreamConnection

from tests.test_outbox import CALLS, RECORD, calls

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def eager_hooks(settings: Any, genesys_settings: Any) -> Iterator[None]:
    """Hooks run in-process (whatever broker the environment names), recorded by the test hook."""
    from monitor_project.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    settings.CONVERSATION_HOOKS = {"end": [RECORD], "wrapup": [RECORD]}
    CALLS.clear()
    yield
    app.conf.task_always_eager = previous


def backfill(*args: str) -> str:
    out = io.StringIO()
    call_command("backfill", *args, "--no-progress", stdout=out)
    return out.getvalue()


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def stored_ids() -> set[str]:
    return set(Conversation.objects.values_list("conversation_id", flat=True))


def ids_of(payloads: list[dict[str, Any]]) -> set[str]:
    return {p["conversationId"] for p in payloads}


def test_a_window_of_more_than_one_page_is_stored_with_its_hooks_once_and_a_second_run_changes_nothing(
    simulator: Simulator,
) -> None:
    payloads = simulator.generate(conversations=130)
    hour, day = timedelta(hours=1), timedelta(days=1)
    window = ["--since", iso(DEFAULT_START - hour), "--until", iso(DEFAULT_START + day)]
    first = backfill(*window)
    assert "1 intervals, 2 pages, 130 conversations" in first and "130 new events" in first
    assert "0 ended, 130 wrapped up" in first
    assert Conversation.objects.filter(state="wrapped_up").count() == 130 == len(ids_of(payloads))
    assert Event.objects.filter(source="backfill").count() == 130
    assert HookDelivery.objects.count() == 130 * 2
    once = Counter({(cid, trigger): 1 for cid in stored_ids() for trigger in ("end", "wrapup")})
    assert Counter((c, t) for _, c, t, _ in calls()) == once

    again = backfill(*window)
    assert "0 new events, 130 duplicates" in again
    assert Event.objects.count() == 130 and HookDelivery.objects.count() == 260 and len(calls()) == 260
    assert StreamCheckpoint.objects.get(source="backfill").events_committed == 260


def test_a_window_longer_than_seven_days_is_fetched_in_intervals_of_at_most_seven_days(
    simulator: Simulator,
) -> None:
    for week in range(3):
        simulator.generate(conversations=2, start=DEFAULT_START + timedelta(days=6 * week))
    day = timedelta(days=1)
    window = ["--since", iso(DEFAULT_START - day), "--until", iso(DEFAULT_START + 16 * day)]
    assert "3 intervals, 3 pages, 6 conversations" in backfill(*window)
    assert Conversation.objects.filter(state="wrapped_up").count() == 6
    assert len(simulator.analytics.stats["queries"]) == 3


def test_the_gaps_of_a_sources_connection_history_are_backfilled_and_nothing_else(
    simulator: Simulator,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    hours = [now - timedelta(hours=n) for n in range(5)]
    history = (("a", hours[4], hours[3], "host:1"), ("b", hours[2], None, "host:2"))
    for connection_id, connected, ended, worker in history:
        StreamConnection.objects.create(
            source="notifications", worker=worker, channel_id=connection_id, connection_id=connection_id,
            connected_at=connected, disconnected_at=ended, last_heartbeat_at=ended or now,
            disconnect_reason="dropped (no close frame)",
        )
    streamed = simulator.generate(conversations=2, start=hours[4] + timedelta(minutes=5))
    lost = simulator.generate(conversations=3, start=hours[3] + timedelta(minutes=10))
    simulator.generate(conversations=2, start=hours[2] + timedelta(minutes=5))  # streamed by "b"

    out = backfill("--source", "notifications", "--since", iso(hours[4]))
    assert "notifications: downtime gap" in out and "3 conversations (0 outside the window)" in out
    assert stored_ids() == ids_of(lost) and not ids_of(streamed) & stored_ids()
    assert "no gaps in the connection history of sse" in backfill("--source", "sse")


def test_the_command_wants_a_window_or_a_source_and_says_why_a_query_failed(simulator: Simulator) -> None:
    with pytest.raises(CommandError, match="give --since"):
        call_command("backfill")
    simulator.analytics.fail_next(403)
    with pytest.raises(CommandError, match="analytics:conversationDetail:view"):
        backfill("--since", "2025-03-03T00:00:00Z", "--until", "2025-03-04T00:00:00Z")


def test_the_progress_bar_grows_with_each_interval_and_counts_what_was_fetched() -> None:
    with tqdm(total=0, file=io.StringIO()) as bar:
        progress = Bar(bar)
        progress.found(130)
        progress.done(100)
        progress.found(6)
        progress.done(36)
        assert (bar.total, bar.n) == (136, 136)
