"""The SSE source against the simulator over loopback HTTP: streaming, resuming, failing well."""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from conversations.genesys.auth import TokenProvider
from conversations.genesys.backoff import Backoff
from conversations.genesys.errors import FatalSourceError
from conversations.genesys.eventstream import SSEMessage
from conversations.genesys.simulator import Simulator, SimulatorServer
from conversations.genesys.sse import SSESource

WAIT = 5.0  # generous upper bound for anything that should happen at once; passing tests never wait this long


@pytest.fixture
def sim() -> Simulator:
    return Simulator(client_id="sim-client", client_secret="sim-secret", seed=7)


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with SimulatorServer(sim) as running:
        yield running


def make_source(url: str, **options: Any) -> SSESource:
    tokens = TokenProvider(login_url=url, client_id="sim-client", client_secret="sim-secret")
    options.setdefault("backoff", Backoff(base=0.01, cap=0.05))
    options.setdefault("read_timeout", 5.0)
    return SSESource(api_url=url, tokens=tokens, stop=threading.Event(), **options)


class Consumer:
    """Runs `source.messages()` in a thread, the way the pipeline does, and hands messages over a queue."""

    def __init__(self, source: SSESource) -> None:
        self.source = source
        self.received: queue.Queue[SSEMessage] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-consumer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for message in self.source.messages():
                self.received.put(message)
        except Exception as exc:  # handed to the test thread, which asserts on it
            self.error = exc

    def take(self, count: int) -> list[SSEMessage]:
        return [self.received.get(timeout=WAIT) for _ in range(count)]

    def finish(self) -> None:
        self.source.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "messages() did not return after stop was set"

    def failure(self) -> BaseException | None:
        self.thread.join(WAIT)
        return self.error


Consume = Callable[[SSESource], Consumer]


@pytest.fixture
def consume() -> Iterator[Consume]:
    consumers: list[Consumer] = []

    def start(source: SSESource) -> Consumer:
        consumer = Consumer(source)
        consumers.append(consumer)
        return consumer

    yield start
    for consumer in consumers:
        consumer.finish()


def payload(n: int) -> dict[str, Any]:
    return {
        "eventType": "conversation:start",
        "conversationId": f"00000000-0000-4000-8000-{n:012d}",
        "timestamp": "2026-11-28T09:00:00.123Z",
        "queueName": "Support Éire 李雷",
    }


def datas(messages: list[SSEMessage]) -> list[dict[str, Any]]:
    return [json.loads(message.data) for message in messages]


# Streaming


def test_every_event_arrives_in_order_with_its_id(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    payloads = sim.generate(conversations=5)
    consumer = consume(make_source(server.url))
    messages = consumer.take(len(payloads))
    assert datas(messages) == payloads
    assert [m.id for m in messages] == [str(n) for n in range(1, len(payloads) + 1)]
    assert sim.stats["token_requests"] == 1 and sim.stats["last_event_ids"] == [None]


def test_the_default_query_asks_for_every_event_type_without_a_media_filter(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.append(payload(1))
    consume(make_source(server.url)).take(1)
    query = sim.stats["queries"][0]
    assert query["eventTypes"] == [
        "conversation:start",
        "conversation:update",
        "conversation:end",
        "conversation:wrapup",
    ]
    assert "filter" not in query


def test_a_query_given_by_the_caller_is_sent_as_is(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.append(payload(1))
    query = {"eventTypes": ["conversation:end"], "filter": {"type": "AND", "clauses": []}}
    consume(make_source(server.url, query=query)).take(1)
    assert sim.stats["queries"] == [query]


def test_an_event_reaches_the_consumer_before_the_next_one_is_sent(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    # Keep-alives are far off, so nothing but the event itself could push it through a buffer.
    sim.keepalive_interval = 60
    consumer = consume(make_source(server.url))
    for n in range(1, 4):
        sim.append(payload(n))
        [message] = consumer.take(1)
        assert message.id == str(n) and sim.stats["appended"] == n


def test_the_checkpointed_last_event_id_is_sent_on_the_first_connection(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.generate(conversations=2)
    consumer = consume(make_source(server.url, last_event_id="6"))
    assert [m.id for m in consumer.take(2)] == ["7", "8"]
    assert sim.stats["last_event_ids"] == ["6"]


@pytest.mark.parametrize(("line_ending", "chunk_size"), [("\r\n", 1), ("\r", 1), ("\n", 3), ("\r\n", 7)])
def test_any_framing_on_the_wire_gives_the_same_messages(
    server: SimulatorServer, sim: Simulator, consume: Consume, line_ending: str, chunk_size: int
) -> None:
    payloads = sim.generate(conversations=3)
    plain = consume(make_source(server.url)).take(len(payloads))
    sim.line_ending, sim.chunk_size, sim.send_bom = line_ending, chunk_size, True
    framed = consume(make_source(server.url)).take(len(payloads))
    assert framed == plain
    assert datas(framed) == payloads


def test_keepalives_keep_the_stream_open_and_are_told_apart_from_events(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.keepalive_interval = 0.02
    sim.keepalive_forms = ("comment", "empty-object", "empty-data")
    source = make_source(server.url)
    consumer = consume(source)
    deadline = time.monotonic() + WAIT
    while sim.stats["keepalives_sent"] < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    sim.append(payload(1))
    messages = consumer.take(1)
    while messages[-1].data in ("", "{}"):
        messages += consumer.take(1)
    # Comments never surface; `data:` and `data: {}` do, as messages the normalizer recognises.
    assert {m.data for m in messages[:-1]} == {"", "{}"}
    assert json.loads(messages[-1].data) == payload(1)
    assert source.stats.reconnects == 0 and source.stats.connects == 1


# Resuming


def test_a_drop_mid_event_resumes_after_the_last_complete_event(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    payloads = sim.generate(conversations=2)
    sim.drop_after(3)
    source = make_source(server.url)
    messages = consume(source).take(len(payloads))
    assert datas(messages) == payloads  # the half fourth event was never delivered, the whole one was, once
    assert sim.stats["last_event_ids"] == [None, "3"]
    assert (source.stats.connects, source.stats.reconnects) == (2, 1)
    assert source.stats.last_connected_at is not None


def test_a_silent_connection_is_abandoned_after_read_timeout(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    payloads = sim.generate(conversations=1)
    sim.stall_after(2)
    source = make_source(server.url, read_timeout=0.3)
    assert datas(consume(source).take(len(payloads))) == payloads
    assert sim.stats["last_event_ids"] == [None, "2"]
    assert "read timeout" in (source.stats.last_error or "")


def test_a_503_is_retried_until_the_stream_opens(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.append(payload(1))
    sim.fail_next(503, count=3)
    source = make_source(server.url)
    assert datas(consume(source).take(1)) == [payload(1)]
    assert sim.stats["statuses"] == [503, 503, 503, 200]
    assert source.stats.reconnects == 3


def test_a_429_waits_at_least_retry_after(
    server: SimulatorServer, sim: Simulator, consume: Consume, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conversations.genesys.sse")
    sim.append(payload(1))
    sim.fail_next(429, retry_after=1)
    started = time.monotonic()
    consume(make_source(server.url)).take(1)
    # The backoff alone would retry within 0.05 s; only Retry-After can account for a full second.
    assert time.monotonic() - started >= 1.0
    assert sim.stats["statuses"] == [429, 200]
    assert "answered 429" in caplog.text and "reconnecting in 1.00s" in caplog.text


def test_a_refused_connection_is_retried_forever(consume: Consume) -> None:
    source = make_source(f"http://127.0.0.1:{closed_port()}")
    consume(source)
    deadline = time.monotonic() + WAIT
    while source.stats.reconnects < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.stats.reconnects >= 5 and source.stats.connects == 0
    assert "Connection refused" in (source.stats.last_error or "")


def test_a_server_restart_resumes_from_the_last_event_id(sim: Simulator, consume: Consume) -> None:
    sim.generate(conversations=1)
    first = SimulatorServer(sim).start()
    consumer = consume(make_source(first.url))
    assert [m.id for m in consumer.take(4)] == ["1", "2", "3", "4"]
    first.stop()
    sim.generate(conversations=1)
    with SimulatorServer(sim, port=first.port):
        assert [m.id for m in consumer.take(4)] == ["5", "6", "7", "8"]
    assert sim.stats["last_event_ids"][-1] == "4"


def test_a_200_that_is_not_an_event_stream_is_retried(
    consume: Consume, caplog: pytest.LogCaptureFixture
) -> None:
    with HtmlServer() as url:
        source = make_source(url)
        consume(source)
        deadline = time.monotonic() + WAIT
        while source.stats.reconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert source.stats.reconnects >= 2 and source.stats.connects == 0
    assert "not text/event-stream" in caplog.text


# Refusals


def test_a_401_renews_the_token_once_and_streams(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.append(payload(1))
    source = make_source(server.url)
    source.tokens.token()
    sim.expire_tokens()
    assert datas(consume(source).take(1)) == [payload(1)]
    assert sim.stats["statuses"] == [401, 200]
    assert sim.stats["token_requests"] == 2


def test_a_401_right_after_a_renewal_is_fatal(
    server: SimulatorServer, sim: Simulator, consume: Consume
) -> None:
    sim.fail_next(401, count=2)
    consumer = consume(make_source(server.url))
    error = consumer.failure()
    assert isinstance(error, FatalSourceError) and "401" in str(error)
    assert sim.stats["statuses"] == [401, 401]
    assert sim.stats["token_requests"] == 2


def test_a_403_is_fatal_at_once(server: SimulatorServer, sim: Simulator, consume: Consume) -> None:
    sim.fail_next(403)
    error = consume(make_source(server.url)).failure()
    assert isinstance(error, FatalSourceError)
    assert "403" in str(error) and "analytics:events:view" in str(error)
    assert sim.stats["stream_requests"] == 1


def test_a_refused_client_is_fatal(server: SimulatorServer, consume: Consume) -> None:
    tokens = TokenProvider(login_url=server.url, client_id="sim-client", client_secret="wrong")
    source = SSESource(api_url=server.url, tokens=tokens, stop=threading.Event())
    error = consume(source).failure()
    assert isinstance(error, FatalSourceError) and "sim-client" in str(error)


def test_tokens_never_reach_the_logs(
    server: SimulatorServer, sim: Simulator, consume: Consume, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim.append(payload(1))
    source = make_source(server.url)
    first = source.tokens.token()
    sim.expire_tokens()
    sim.drop_after(0)
    consume(source).take(1)
    second = source.tokens.token()
    assert first not in caplog.text and second not in caplog.text
    assert "answered 401" in caplog.text and "reconnecting" in caplog.text


# Stopping


def test_setting_stop_returns_from_a_quiet_stream_at_once(server: SimulatorServer, sim: Simulator) -> None:
    sim.keepalive_interval = 60
    source = make_source(server.url, read_timeout=60)
    consumer = Consumer(source)
    deadline = time.monotonic() + WAIT
    while sim.stats["open_streams"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    consumer.finish()
    assert time.monotonic() - started < 1.0
    assert consumer.error is None


def test_setting_stop_interrupts_a_wait_before_reconnecting(server: SimulatorServer, sim: Simulator) -> None:
    sim.fail_next(429, retry_after=60)
    source = make_source(server.url)
    consumer = Consumer(source)
    deadline = time.monotonic() + WAIT
    while source.stats.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    consumer.finish()
    assert time.monotonic() - started < 1.0


def test_close_interrupts_a_wait_before_reconnecting(server: SimulatorServer, sim: Simulator) -> None:
    sim.fail_next(429, retry_after=60)
    source = make_source(server.url)
    consumer = Consumer(source)
    deadline = time.monotonic() + WAIT
    while source.stats.reconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    source.close()
    consumer.thread.join(WAIT)
    assert not consumer.thread.is_alive() and time.monotonic() - started < 1.0


def test_close_ends_messages(server: SimulatorServer, sim: Simulator) -> None:
    sim.keepalive_interval = 60
    source = make_source(server.url, read_timeout=60)
    consumer = Consumer(source)
    deadline = time.monotonic() + WAIT
    while sim.stats["open_streams"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()
    consumer.thread.join(WAIT)
    assert not consumer.thread.is_alive() and consumer.error is None


# Helpers


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HtmlServer:
    """A loopback server answering every POST with 200 and an HTML page, like a captive portal."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _HtmlHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = (
            b"<html>sign in</html>"
            if self.path.endswith("/events")
            else b'{"access_token": "t", "expires_in": 60}'
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path.endswith("/events") else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return
