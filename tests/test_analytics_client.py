"""The analytics details query client against the simulator over loopback HTTP: paging, intervals of at most
7 days, one hand-out per conversation, and the failure paths (429 with Retry-After, 5xx, 401 renewal, 403)."""
from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from conversations.genesys.analytics import DETAILS_QUERY_PATH, AnalyticsApi, QueryInterrupted, intervals
from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import FatalSourceError, TransientError
from conversations.genesys.simulator import Simulator, SimulatorServer

START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def client(server: SimulatorServer, **kwargs: Any) -> AnalyticsApi:
    tokens = TokenProvider(login_url=server.url, client_id="sim-client", client_secret="sim-secret")
    kwargs.setdefault("backoff", lambda: Backoff(base=0.01, cap=0.05))
    return AnalyticsApi(api_url=server.url, tokens=tokens, **kwargs)


def ids(conversations: list[dict[str, Any]]) -> list[str]:
    return [c["conversationId"] for c in conversations]


def generated_ids(payloads: list[dict[str, Any]]) -> set[str]:
    return {p["conversationId"] for p in payloads}


def test_a_window_is_read_page_by_page_and_each_conversation_is_handed_out_once(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    payloads = simulator.generate(conversations=45)
    simulator.analytics.page_overlap = 3  # pages shift while data arrives: rows repeat
    pages = list(client(sim_server, page_size=20).pages(START, START + DAY))
    found = [c for page in pages for c in page.conversations]
    assert [p.number for p in pages] == [1, 2, 3] and sum(p.rows for p in pages) == 45 + 2 * 3
    assert len(ids(found)) == len(set(ids(found))) == 45 and set(ids(found)) == generated_ids(payloads)
    assert all(p.total_hits == 45 for p in pages)
    bodies = simulator.analytics.stats["queries"]
    assert [b["paging"] for b in bodies] == [{"pageSize": 20, "pageNumber": n} for n in (1, 2, 3)]
    assert {(b["order"], b["orderBy"]) for b in bodies} == {("asc", "conversationStart")}


def test_a_window_longer_than_seven_days_is_queried_in_intervals_of_at_most_seven_days(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    weeks = [simulator.generate(conversations=2, start=START + n * 6 * DAY) for n in range(3)]
    found = list(client(sim_server).conversations(START - DAY, START + 16 * DAY))
    assert set(ids(found)) == set().union(*(generated_ids(w) for w in weeks)) and len(found) == 6
    spans = [tuple(datetime.fromisoformat(t) for t in b["interval"].split("/"))
             for b in simulator.analytics.stats["queries"]]
    assert len(spans) == 3 and all(end - start <= 7 * DAY for start, end in spans)
    assert spans[0][0] == START - DAY and spans[-1][1] == START + 16 * DAY
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no hole, no overlap
    assert intervals(START, START) == []


def test_the_simulator_answers_the_conversations_that_overlap_the_interval(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    conversation = simulator.generate(conversations=1)
    start = datetime.fromisoformat(conversation[0]["timestamp"])
    ended = datetime.fromisoformat(conversation[-2]["timestamp"])
    wrapped = datetime.fromisoformat(conversation[-1]["timestamp"])
    api = client(sim_server)
    second = timedelta(seconds=1)
    assert len(list(api.conversations(ended + second, wrapped))) == 1  # only its wrap-up is inside
    assert list(api.conversations(wrapped + second, wrapped + DAY)) == []
    assert list(api.conversations(start - DAY, start)) == []  # the interval's end is exclusive


def test_the_simulator_answers_from_every_conversation_it_told_whether_anyone_heard_it_or_not(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    simulator.notifications.paused = True  # no socket hears anything
    simulator.reorder_window, simulator.duplicate_rate = 4, 0.5  # nor in order, nor once
    payloads = simulator.generate(conversations=6)
    found = list(client(sim_server).conversations(START, START + DAY))
    assert set(ids(found)) == generated_ids(payloads)
    wrapups = [s for c in found for p in c["participants"] for session in p["sessions"]
               for s in session["segments"] if s["segmentType"] == "wrapup"]
    # Each conversation as its newest payload tells it: wrapped up.
    assert len(wrapups) == 6 and all(s.get("wrapUpCode") and s.get("segmentEnd") for s in wrapups)


def test_the_simulator_refuses_intervals_over_seven_days_bad_paging_and_missing_tokens(
    sim_server: SimulatorServer,
) -> None:
    tokens = TokenProvider(login_url=sim_server.url, client_id="sim-client", client_secret="sim-secret")
    token = tokens.token()
    url = sim_server.url + DETAILS_QUERY_PATH

    def post(body: dict[str, Any], auth: str = f"Bearer {token}") -> requests.Response:
        return requests.post(url, json=body, headers={"Authorization": auth}, timeout=5)

    too_long = post({"interval": "2025-03-01T00:00:00.000Z/2025-03-08T00:00:00.001Z"})
    assert too_long.status_code == 400 and "7 days" in too_long.json()["message"]
    day = "2025-03-01T00:00:00Z/2025-03-02T00:00:00Z"
    assert post({"interval": day, "paging": {"pageSize": 101}}).status_code == 400
    empty = post({"interval": day})
    assert empty.status_code == 200 and empty.json() == {"totalHits": 0}  # no "conversations" key when empty
    assert post({"interval": day}, auth="Bearer nope").status_code == 401


def test_a_429_is_retried_after_its_retry_after(simulator: Simulator, sim_server: SimulatorServer) -> None:
    simulator.generate(conversations=3)
    simulator.analytics.fail_next(429, retry_after=1)
    began = time.monotonic()
    found = list(client(sim_server).conversations(START, START + DAY))
    assert time.monotonic() - began >= 1.0 and len(found) == 3
    assert simulator.analytics.stats["statuses"] == [429, 200]


def test_server_errors_are_retried_with_backoff_up_to_a_limit(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    simulator.generate(conversations=3)
    simulator.analytics.fail_next(503, count=2)
    assert len(list(client(sim_server).conversations(START, START + DAY))) == 3
    simulator.analytics.fail_next(500, count=5)
    with pytest.raises(TransientError, match="still failing after 3 tries"):
        list(client(sim_server, max_attempts=3).conversations(START, START + DAY))
    assert simulator.analytics.stats["statuses"] == [503, 503, 200, 500, 500, 500]


def test_a_401_renews_the_token_once_and_a_second_401_is_fatal(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    simulator.generate(conversations=2)
    api = client(sim_server)
    assert len(list(api.conversations(START, START + DAY))) == 2
    simulator.expire_tokens()
    assert len(list(api.conversations(START, START + DAY))) == 2
    assert api.tokens.token_requests == 2
    simulator.analytics.fail_next(401, count=2)
    with pytest.raises(FatalSourceError, match="freshly issued token"):
        list(api.conversations(START, START + DAY))


def test_a_403_is_fatal_at_once_and_names_the_permission(
    simulator: Simulator, sim_server: SimulatorServer,
) -> None:
    simulator.analytics.fail_next(403)
    api = client(sim_server)
    with pytest.raises(FatalSourceError, match="analytics:conversationDetail:view"):
        list(api.conversations(START, START + DAY))
    assert api.requests == 1


def test_a_stop_during_a_retry_wait_ends_the_query(simulator: Simulator, sim_server: SimulatorServer) -> None:
    simulator.analytics.fail_next(429, retry_after=30)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(QueryInterrupted):  # not 30 s later: the wait ends with the stop
        list(client(sim_server, stop=stop).conversations(START, START + DAY))
