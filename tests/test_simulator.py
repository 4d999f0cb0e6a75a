"""The Genesys simulator itself, over real loopback HTTP: OAuth, the SSE stream, its faults and its stories.

The stream is parsed naively here on purpose: these tests check the bytes the simulator sends, not the
project's SSE decoder. No database is needed.
"""
from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from django.core.management import call_command

from conversations.genesys.scenario import WRAPUP_CODE_NAMES, WRAPUP_CODES, Scenario
from conversations.genesys.simulator import BOM, Simulator, SimulatorServer

EVENTS_PATH = "/api/v2/analytics/events"
QUERY = {
    "eventTypes": ["conversation:start", "conversation:update", "conversation:end", "conversation:wrapup"],
    "interval": "PT1S",
}
ISO_MILLIS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --- fixtures and a naive client ----------------------------------------------------------------------------


@pytest.fixture
def sim() -> Simulator:
    return Simulator(client_id="sim-client", client_secret="sim-secret", seed=7, keepalive_interval=30.0)


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as running:
        yield running


@pytest.fixture
def token(server: SimulatorServer) -> str:
    return get_token(server)


def get_token(server: SimulatorServer, client_id: str = "sim-client", secret: str = "sim-secret") -> str:
    response = request_token(server, client_id, secret)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def request_token(server: SimulatorServer, client_id: str, secret: str) -> requests.Response:
    return requests.post(
        f"{server.url}/oauth/token",
        auth=(client_id, secret),
        data={"grant_type": "client_credentials"},
        timeout=2,
    )


def open_stream(
    server: SimulatorServer, token: str, *, last_event_id: str | None = None, read_timeout: float = 2.0
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return requests.post(
        f"{server.url}{EVENTS_PATH}", json=QUERY, headers=headers, stream=True, timeout=(2, read_timeout)
    )


def read_until(response: requests.Response, done: Callable[[bytes], bool]) -> bytes:
    """Bytes of the body until `done(received)` says so (the read timeout bounds a silent server)."""
    received = b""
    for chunk in response.iter_content(chunk_size=None):
        received += chunk
        if done(received):
            break
    return received


def events_in(raw: bytes) -> list[tuple[str | None, str]]:
    """(id, data) of each complete event block; comment-only blocks are skipped."""
    text = raw.decode("utf-8").lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        fields = [line.split(":", 1) for line in block.split("\n") if line and not line.startswith(":")]
        values = {name: value.removeprefix(" ") for name, value in fields}
        if "data" in values:
            events.append((values.get("id"), values["data"]))
    return events


def has_events(count: int) -> Callable[[bytes], bool]:
    return lambda raw: len(events_in(raw)) >= count


def read_events(response: requests.Response, count: int) -> list[tuple[str | None, dict[str, Any]]]:
    raw = read_until(response, has_events(count))
    return [(event_id, json.loads(data)) for event_id, data in events_in(raw)]


def event(number: int, event_type: str = "conversation:start") -> dict[str, Any]:
    return {"eventType": event_type, "conversationId": f"c-{number}", "timestamp": "2025-03-03T09:00:00.000Z"}


# --- OAuth --------------------------------------------------------------------------------------------------


def test_good_credentials_get_a_bearer_token(server: SimulatorServer, sim: Simulator) -> None:
    sim.token_ttl = 120
    body = request_token(server, "sim-client", "sim-secret").json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 120
    assert len(body["access_token"]) >= 20


@pytest.mark.parametrize("client_id, secret", [("sim-client", "wrong"), ("someone-else", "sim-secret")])
def test_bad_credentials_get_invalid_client(server: SimulatorServer, client_id: str, secret: str) -> None:
    response = request_token(server, client_id, secret)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_a_token_request_without_basic_auth_is_refused(server: SimulatorServer) -> None:
    form = {"grant_type": "client_credentials"}
    response = requests.post(f"{server.url}/oauth/token", data=form, timeout=2)
    assert response.status_code == 401


# --- authentication of the stream ---------------------------------------------------------------------------


def assert_genesys_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)
    assert body["message"]


def test_an_unknown_token_gets_a_genesys_401(server: SimulatorServer) -> None:
    with open_stream(server, "not-a-token") as response:
        assert_genesys_error(response, 401, "bad.credentials")


def test_expired_tokens_get_a_401_and_a_new_token_works(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    sim.expire_tokens()
    with open_stream(server, token) as response:
        assert response.status_code == 401
    with open_stream(server, get_token(server)) as response:
        assert response.status_code == 200


def test_a_token_stops_working_when_its_ttl_runs_out(server: SimulatorServer, sim: Simulator) -> None:
    sim.token_ttl = 0.2
    token = get_token(server)
    time.sleep(0.25)
    with open_stream(server, token) as response:
        assert response.status_code == 401


# --- the stream ---------------------------------------------------------------------------------------------


def test_the_stream_sends_the_log_as_sse_with_increasing_ids(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    payloads = sim.generate(conversations=3)
    with open_stream(server, token) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["Transfer-Encoding"] == "chunked"
        received = read_events(response, len(payloads))
    assert [data for _, data in received] == payloads
    ids = [int(event_id) for event_id, _ in received if event_id is not None]
    assert ids == sorted(ids) and len(set(ids)) == len(payloads)


def test_the_stream_resumes_after_last_event_id(server: SimulatorServer, sim: Simulator, token: str) -> None:
    ids = [sim.append(event(number)) for number in range(5)]
    with open_stream(server, token, last_event_id=ids[2]) as response:
        received = read_events(response, 2)
    assert [event_id for event_id, _ in received] == ids[3:]
    assert sim.stats["last_event_ids"] == [ids[2]]


def test_a_last_event_id_older_than_the_retained_log_starts_at_the_oldest_entry() -> None:
    sim = Simulator(seed=1, max_log=3)
    ids = [sim.append(event(number)) for number in range(6)]
    with SimulatorServer(sim) as small, open_stream(small, get_token(small), last_event_id=ids[0]) as stream:
        received = read_events(stream, 3)
    assert [event_id for event_id, _ in received] == ids[3:]


def test_an_id_this_server_never_gave_replays_the_whole_log(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    ids = [sim.append(event(number)) for number in range(3)]
    with open_stream(server, token, last_event_id="987654") as response:
        assert [event_id for event_id, _ in read_events(response, 3)] == ids


def test_a_new_event_reaches_a_connected_client_within_milliseconds(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    with open_stream(server, token) as response:
        assert response.status_code == 200
        time.sleep(0.05)  # the stream is now waiting; keep-alives are 30 s away
        started = time.monotonic()
        sim.append(event(1))
        received = read_events(response, 1)
        elapsed = time.monotonic() - started
    assert received[0][1]["conversationId"] == "c-1"
    assert elapsed < 0.2


def test_raw_entries_are_written_verbatim_and_events_may_lack_an_id(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    sim.append_raw("event: odd\ndata: line one\ndata: line two\n\n")
    assert sim.append(event(1), with_id=False) is None
    with open_stream(server, token) as response:
        raw = read_until(response, has_events(2))
    assert raw.startswith(b"event: odd\ndata: line one\ndata: line two\n\ndata: {")
    assert b"id:" not in raw


def test_keep_alives_are_sent_while_idle_in_every_form(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    sim.keepalive_interval = 0.02
    sim.keepalive_forms = ("comment", "empty-object", "empty-data")
    with open_stream(server, token) as response:
        raw = read_until(response, lambda received: received.count(b"\n") >= 5)
    assert raw.startswith(b": keep-alive\ndata: {}\n\ndata:\n\n")
    assert sim.stats["keepalives_sent"] >= 3


# --- byte format knobs --------------------------------------------------------------------------------------


def test_chunk_size_splits_the_body_into_small_http_chunks(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    sim.chunk_size = 3
    sim.append(event(1))
    with open_stream(server, token) as response:
        chunks = []
        for chunk in response.raw.read_chunked(decode_content=False):
            chunks.append(chunk)
            if b"".join(chunks).endswith(b"\n\n"):
                break
    assert max(len(chunk) for chunk in chunks) == 3
    assert events_in(b"".join(chunks))[0][1] == json.dumps(event(1), separators=(",", ":"))


@pytest.mark.parametrize("line_ending", ["\r\n", "\r"])
def test_line_ending_changes_every_line_end(
    server: SimulatorServer, sim: Simulator, token: str, line_ending: str
) -> None:
    sim.line_ending = line_ending
    sim.keepalive_interval = 0.02
    event_id = str(sim.append(event(1)))
    ending = line_ending.encode()
    with open_stream(server, token) as response:
        raw = read_until(response, lambda received: b"keep-alive" + ending in received)
    assert raw.startswith(b"id: " + event_id.encode() + ending + b"data: {")
    without_line_ends = raw.replace(ending, b"")
    assert b"\n" not in without_line_ends and b"\r" not in without_line_ends


def test_send_bom_starts_the_stream_with_a_utf8_bom(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    sim.send_bom = True
    sim.append(event(1))
    with open_stream(server, token) as response:
        raw = read_until(response, has_events(1))
    assert raw.startswith(BOM + b"id: ")
    assert raw.count(BOM) == 1


def test_a_bad_line_ending_is_refused() -> None:
    with pytest.raises(ValueError):
        Simulator().line_ending = "\n\r"


# --- failure knobs ------------------------------------------------------------------------------------------


def test_fail_next_429_answers_with_retry_after_then_streams_again(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    sim.fail_next(429, retry_after=3)
    with open_stream(server, token) as response:
        assert_genesys_error(response, 429, "too.many.requests.retry.after")
        assert response.headers["Retry-After"] == "3"
    with open_stream(server, token) as response:
        assert response.status_code == 200
    assert sim.stats["statuses"] == [429, 200]


def test_fail_next_503_counts_down(server: SimulatorServer, sim: Simulator, token: str) -> None:
    sim.fail_next(503, count=2)
    statuses = []
    for _ in range(3):
        with open_stream(server, token) as response:
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert_genesys_error(response, 503, "service.unavailable")
    assert statuses == [503, 503, 200]


def test_drop_after_sends_half_an_event_then_breaks_the_connection(
    server: SimulatorServer, sim: Simulator, token: str
) -> None:
    for number in range(4):
        sim.append(event(number))
    sim.drop_after(2)
    received = b""
    with open_stream(server, token) as response, pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in response.iter_content(chunk_size=None):
            received += chunk
    assert [json.loads(data)["conversationId"] for _, data in events_in(received)] == ["c-0", "c-1"]
    tail = received.split(b"\n\n")[-1]
    assert tail.startswith(b"id: ") and b"c-2" not in tail
    with open_stream(server, token) as response:  # the fault was one-shot
        assert len(read_events(response, 4)) == 4


@pytest.mark.parametrize("logged", [1, 2])  # stalls with the next entry waiting, and with none
def test_stall_after_goes_silent_without_keep_alives(
    server: SimulatorServer, sim: Simulator, token: str, logged: int
) -> None:
    sim.keepalive_interval = 0.02
    for number in range(logged):
        sim.append(event(number))
    sim.stall_after(1)
    received = b""
    with (
        open_stream(server, token, read_timeout=0.3) as response,
        pytest.raises(requests.exceptions.ConnectionError),
    ):
        for chunk in response.iter_content(chunk_size=None):
            received += chunk
    assert len(events_in(received)) == 1
    assert b"keep-alive" not in received


def test_stopping_the_server_ends_open_streams_quickly(sim: Simulator) -> None:
    server = SimulatorServer(sim).start()
    sim.append(event(1))
    response = open_stream(server, get_token(server))
    read_until(response, has_events(1))
    started = time.monotonic()
    server.stop()
    rest = b"".join(response.iter_content(chunk_size=None))  # a clean end of the body, no exception
    assert rest == b""
    assert time.monotonic() - started < 1.0


# --- stats, wrap-up codes, generation -----------------------------------------------------------------------


def test_stats_count_what_was_served(server: SimulatorServer, sim: Simulator, token: str) -> None:
    request_token(server, "sim-client", "wrong")
    sim.append(event(1))
    sim.fail_next(500)
    with open_stream(server, token) as response:
        assert response.status_code == 500
    with open_stream(server, token, last_event_id="1") as response:
        assert response.status_code == 200
    stats = sim.stats
    assert stats["token_requests"] == 2
    assert stats["token_statuses"] == [200, 401]
    assert stats["stream_requests"] == 2
    assert stats["last_event_ids"] == [None, "1"]
    assert stats["statuses"] == [500, 200]
    assert stats["queries"] == [QUERY, QUERY]
    assert stats["appended"] == 1


def test_wrapup_codes_resolve_to_names(server: SimulatorServer, token: str) -> None:
    code = WRAPUP_CODES[0]
    headers = {"Authorization": f"Bearer {token}"}
    found = requests.get(f"{server.url}/api/v2/routing/wrapupcodes/{code.id}", headers=headers, timeout=2)
    missing = requests.get(f"{server.url}/api/v2/routing/wrapupcodes/nope", headers=headers, timeout=2)
    assert (found.json()["id"], found.json()["name"]) == (code.id, code.name)
    assert missing.status_code == 404


def test_live_generation_streams_fresh_events(server: SimulatorServer, sim: Simulator, token: str) -> None:
    sim.start_live(rate=200)
    try:
        with open_stream(server, token) as response:
            received = read_events(response, 10)
    finally:
        sim.stop_live()
    assert not sim.live
    newest = max(datetime.fromisoformat(data["timestamp"]) for _, data in received)
    assert datetime.now(UTC) - newest < timedelta(seconds=5)
    assert len({data["conversationId"] for _, data in received}) > 1  # conversations interleave


def test_duplicate_rate_sends_each_event_twice_with_new_ids(sim: Simulator) -> None:
    sim.duplicate_rate = 1.0
    payloads = sim.generate(conversations=2)
    entries = sim.read_log(0, limit=1000)
    assert len(entries) == 2 * len(payloads)
    assert entries[0].data == entries[1].data and entries[0].sse_id != entries[1].sse_id


def test_malformed_rate_adds_data_that_is_not_a_valid_event(sim: Simulator) -> None:
    sim.malformed_rate = 1.0
    payloads = sim.generate(conversations=3)
    entries = sim.read_log(0, limit=1000)
    assert len(entries) == 2 * len(payloads)
    malformed = entries[1::2]
    assert all(_not_an_event(entry.data) for entry in malformed)


def _not_an_event(data: bytes) -> bool:
    try:
        value = json.loads(data)
    except ValueError:
        return True
    return not isinstance(value, dict) or "conversationId" not in value


def test_reorder_window_shuffles_neighbours_but_loses_nothing(sim: Simulator) -> None:
    sim.reorder_window = 3
    payloads = sim.generate(conversations=5)
    logged = [json.loads(entry.data) for entry in sim.read_log(0, limit=1000)]
    assert logged != payloads
    assert sorted(logged, key=json.dumps) == sorted(payloads, key=json.dumps)


# --- the scenario -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timeline() -> list[dict[str, Any]]:
    return Scenario(seed=11).timeline(60)


def by_conversation(payloads: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    conversations: dict[str, list[dict[str, Any]]] = {}
    for payload in payloads:
        conversations.setdefault(payload["conversationId"], []).append(payload)
    return conversations


def test_the_same_seed_tells_the_same_story() -> None:
    assert Scenario(seed=5).timeline(5) == Scenario(seed=5).timeline(5)
    assert Scenario(seed=5).timeline(5) != Scenario(seed=6).timeline(5)


def test_every_lifecycle_follows_the_contract(timeline: list[dict[str, Any]]) -> None:
    shape = re.compile(r"^start update( update)? end wrapup$")
    for events in by_conversation(timeline).values():
        kinds = " ".join(payload["eventType"].removeprefix("conversation:") for payload in events)
        assert shape.match(kinds), kinds
        stamps = [payload["timestamp"] for payload in events]
        assert all(ISO_MILLIS_Z.match(stamp) for stamp in stamps)
        assert stamps == sorted(set(stamps))  # strictly increasing
        for payload in events:
            times = [p.get(key) for p in payload["participants"] for key in ("connectedTime", "endTime")]
            assert all(t <= payload["timestamp"] for t in times if t is not None)


def test_the_story_covers_media_directions_transfers_and_wrapups(timeline: list[dict[str, Any]]) -> None:
    assert {(p["mediaType"], p["direction"]) for p in timeline} >= {
        ("voice", "inbound"), ("voice", "outbound"), ("chat", "inbound"), ("callback", "outbound")
    }
    ends = [p for p in timeline if p["eventType"] == "conversation:end"]
    assert any(len([x for x in p["participants"] if x["purpose"] == "agent"]) == 2 for p in ends)
    assert len({x["userId"] for p in ends for x in p["participants"] if x["purpose"] == "agent"}) >= 5
    wrapups = [p for p in timeline if p["eventType"] == "conversation:wrapup"]
    assert all(WRAPUP_CODE_NAMES[p["wrapup"]["code"]] == p["wrapup"]["name"] for p in wrapups)
    assert all("wrapup" not in p for p in timeline if p["eventType"] != "conversation:wrapup")


def test_numbers_and_names_look_real(timeline: list[dict[str, Any]]) -> None:
    for payload in timeline:
        if payload["mediaType"] == "chat":
            assert "ani" not in payload and "dnis" not in payload
        else:
            assert payload["ani"].startswith("tel:+") and payload["dnis"].startswith("tel:+")
    names = {x["name"] for p in timeline for x in p["participants"]}
    assert not all(name.isascii() for name in names)
    assert {"Zoë Ó Briain", "李雷"} <= names


# --- the management command ---------------------------------------------------------------------------------


def test_the_management_command_serves_and_stops() -> None:
    out = io.StringIO()
    call_command(
        "genesys_simulator", port=0, rate=50, conversations=2, duration=0.3, stats_interval=0.1, stdout=out
    )
    assert re.search(r"http://127\.0\.0\.1:\d+", out.getvalue())
