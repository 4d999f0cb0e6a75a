"""The signed webhook against a real receiver on loopback, written from the README's description: it verifies
the HMAC of "<timestamp>.<body>", rejects stale timestamps (replays) and bad signatures, and processes each
idempotency key once."""
from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from django.core.exceptions import ImproperlyConfigured

from conversations import hooks, services
from conversations.models import HookDelivery

from tests.factories import lifecycle, typed

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "whsec-test-7c1f"
WEBHOOK = "conversations.hooks.signed_webhook"


# -- the receiver, as the README describes it ----------------------------------------------------------

TOLERANCE_SECONDS = 300


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def verify(secret: bytes, headers: Any, body: bytes, *, now: float) -> dict[str, Any]:
    """README: recompute the signature over "<timestamp>.<raw body>", compare in constant time, refuse a
    timestamp outside the tolerance (a replay), then parse."""
    timestamp = headers.get("X-Monitor-Timestamp", "")
    signature = headers.get("X-Monitor-Signature", "")
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise Rejected(401, "bad signature")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        raise Rejected(400, "timestamp outside the tolerance: a replay")
    event = json.loads(body)
    if event["idempotency_key"] != headers.get("X-Monitor-Idempotency-Key"):
        raise Rejected(400, "idempotency key header and body disagree")
    return event


class Receiver:
    """What a downstream system would run: verification, dedupe on the idempotency key, processing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.verified = 0
        self.rejected: Counter[str] = Counter()
        self.processed: Counter[str] = Counter()  # idempotency key -> times processed
        self.events: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.answers: list[int] = []  # statuses to answer instead, one per request, before processing
        self.delays: list[float] = []  # seconds to stall, one per request
        self.echo_path = False  # answer with the request line, as many servers' error pages do
        self.clock_offset = 0.0

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        with self.lock:
            self.requests.append((headers, body))
            delay = self.delays.pop(0) if self.delays else 0.0
            forced = self.answers.pop(0) if self.answers else None
        time.sleep(delay)
        try:
            event = verify(SECRET.encode(), headers, body, now=time.time() + self.clock_offset)
        except Rejected as exc:
            with self.lock:
                self.rejected[str(exc)] += 1
            return exc.status, str(exc)
        with self.lock:
            self.verified += 1
            if forced is not None:
                return forced, "try again later" if forced >= 429 else "no such account"
            key = event["idempotency_key"]
            if self.processed[key]:
                self.duplicates += 1
                return 200, "already processed"
            self.processed[key] += 1
            self.events[key] = event
        return 200, "ok"


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, text = state.handle(dict(self.headers.items()), body)
            if state.echo_path:
                text = f"{text}: cannot {self.command} {self.path}"
            payload = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the sender timed out and left
                pass

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/hooks/monitor"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def webhook_settings(settings: Any, receiver: tuple[Receiver, str]) -> Iterator[None]:
    from monitor_project.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    settings.HOOK_WEBHOOK_URLS = [receiver[1]]
    settings.HOOK_WEBHOOK_SECRET = SECRET
    settings.HOOK_WEBHOOK_TIMEOUT = 2.0
    settings.CONVERSATION_HOOKS = {"end": [WEBHOOK], "wrapup": [WEBHOOK]}
    settings.HOOK_RETRY_BASE = 0.0
    settings.HOOK_MAX_ATTEMPTS = 4
    yield
    app.conf.task_always_eager = previous


def ingest(payloads: list[dict[str, Any]]) -> services.BatchResult:
    return services.ingest_batch(events=[typed(p) for p in payloads], source="sse")


# -- tests ----------------------------------------------------------------------------------------------


def test_the_readme_receiver_verifies_every_signature_and_sees_each_delivery_once(
    receiver: tuple[Receiver, str],
) -> None:
    state, _ = receiver
    state.answers = [503, 503, 429]  # the first three requests fail: retried with the same key
    payloads = [p for n in range(10) for p in lifecycle(f"conv-{n}", offset=n)]
    wire = payloads + payloads[::3]
    random.Random(5).shuffle(wire)
    for start in range(0, len(wire), 6):
        ingest(wire[start:start + 6])

    assert len(state.requests) == 20 + 3
    assert state.verified == len(state.requests) and not state.rejected
    assert len(state.processed) == 20 and set(state.processed.values()) == {1}
    seen = Counter((e["conversation_id"], e["type"]) for e in state.events.values())
    expected = {(f"conv-{n}", t): 1 for n in range(10) for t in ("conversation.end", "conversation.wrapup")}
    assert seen == Counter(expected)
    assert HookDelivery.objects.filter(status="succeeded").count() == 20
    # In-process, a retry runs at once: the first delivery took the three failures and succeeded on attempt 4.
    assert sorted(HookDelivery.objects.values_list("attempts", flat=True)) == [1] * 19 + [4]


def test_the_body_carries_the_summary_and_the_headers_the_signature(receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    ingest(lifecycle("conv-1"))
    headers, body = state.requests[-1]
    event = json.loads(body)
    assert event["type"] == "conversation.wrapup" and event["conversation_id"] == "conv-1"
    assert event["summary"]["wrapup"]["notes"] == "Kundin zufrieden ✓"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Monitor-Idempotency-Key"] == event["idempotency_key"]
    assert abs(int(headers["X-Monitor-Timestamp"]) - time.time()) < 60
    assert headers["X-Monitor-Signature"] == hooks.sign(body, timestamp=int(headers["X-Monitor-Timestamp"]),
                                                        secret=SECRET)


def test_a_replayed_request_is_rejected_and_never_processed_twice(receiver: tuple[Receiver, str]) -> None:
    state, url = receiver
    ingest(lifecycle("conv-1"))
    headers, body = state.requests[0]
    replay = {name: value for name, value in headers.items() if name.startswith(("X-Monitor", "Content"))}

    assert requests.post(url, data=body, headers=replay, timeout=5).text == "already processed"
    state.clock_offset = TOLERANCE_SECONDS + 1  # the same request, replayed later
    late = requests.post(url, data=body, headers=replay, timeout=5)
    assert (late.status_code, late.text) == (400, "timestamp outside the tolerance: a replay")
    state.clock_offset = 0
    tampered = requests.post(url, data=body.replace(b"conv-1", b"conv-9"), headers=replay, timeout=5)
    assert (tampered.status_code, tampered.text) == (401, "bad signature")
    # A fresh timestamp needs a fresh signature, which needs the secret.
    forged = {**replay, "X-Monitor-Timestamp": str(int(replay["X-Monitor-Timestamp"]) + 1)}
    assert requests.post(url, data=body, headers=forged, timeout=5).status_code == 401
    assert set(state.processed.values()) == {1} and len(state.processed) == 2


def origin(url: str) -> str:
    """Scheme, host and port: all of a webhook URL that a log line or a stored error may show."""
    return url.split("/hooks/")[0]


def test_a_4xx_answer_fails_the_delivery_without_retrying(receiver: tuple[Receiver, str]) -> None:
    state, url = receiver
    state.answers = [404]
    ingest(lifecycle("conv-1")[:4])
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.last_error == f"PermanentHookError: webhook {origin(url)} answered 404: no such account"
    assert len(state.requests) == 1


def test_5xx_answers_are_retried_until_the_last_attempt_then_fail(receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    state.answers = [500, 502, 503, 504]
    ingest(lifecycle("conv-1")[:4])
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 4)
    assert "answered 504" in delivery.last_error and delivery.last_error.startswith("TransientHookError")
    assert len(state.requests) == 4 and not state.processed


def test_a_timeout_is_retried(settings: Any, receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    settings.HOOK_WEBHOOK_TIMEOUT = 0.3
    state.delays = [1.0]
    started = time.monotonic()
    ingest(lifecycle("conv-1")[:4])
    assert time.monotonic() - started >= 0.3
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("succeeded", 2)
    assert delivery.last_error.startswith("TransientHookError") and "timed out" in delivery.last_error
    assert len(state.processed) == 1


def test_a_refused_connection_is_retried_then_fails_with_its_error(settings: Any) -> None:
    settings.HOOK_WEBHOOK_URLS = ["http://127.0.0.1:9/hooks"]  # nothing listens on the discard port
    ingest(lifecycle("conv-1")[:4])
    delivery = HookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("failed", 4)
    expected = "TransientHookError: webhook http://127.0.0.1:9: connection failed: NewConnectionError"
    assert delivery.last_error.startswith(expected)


def test_every_configured_url_receives_the_delivery(settings: Any, receiver: tuple[Receiver, str]) -> None:
    state, url = receiver
    settings.HOOK_WEBHOOK_URLS = [url, url + "?copy=2"]
    ingest(lifecycle("conv-1")[:4])
    assert len(state.requests) == 2 and state.verified == 2
    assert state.duplicates == 1  # one key: the receiver processes it once


def test_the_secret_is_never_logged(caplog: pytest.LogCaptureFixture, receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    state.answers = [503]
    with caplog.at_level("DEBUG"):
        ingest(lifecycle("conv-1"))
    assert caplog.records and SECRET not in caplog.text


# A Slack-style webhook: the path is the credential.
SECRET_PATH = "/services/T000/B000/XXXXsecretXXXX"


def test_a_secret_in_the_webhook_path_reaches_no_log_line_and_no_stored_error(
    settings: Any, caplog: pytest.LogCaptureFixture, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    state.echo_path = True
    with caplog.at_level("DEBUG"), caplog.at_level("DEBUG", logger="urllib3"):
        settings.HOOK_WEBHOOK_URLS = [origin(url) + SECRET_PATH]
        state.answers = [500]  # refused once, then delivered
        ingest(lifecycle("conv-1")[:4])
        state.answers = [404]  # an error page that quotes the request line
        ingest(lifecycle("conv-2")[:4])
        settings.HOOK_WEBHOOK_URLS = ["http://127.0.0.1:9" + SECRET_PATH]  # connection refused
        ingest(lifecycle("conv-3")[:4])

    outcomes = dict(HookDelivery.objects.values_list("conversation__conversation_id", "status"))
    assert outcomes == {"conv-1": "succeeded", "conv-2": "failed", "conv-3": "failed"}
    assert len(state.requests) == 3
    assert any("urllib3" in record.name for record in caplog.records)  # its DEBUG request lines were there
    assert any(origin(url) in record.getMessage() for record in caplog.records)
    errors = list(HookDelivery.objects.values_list("last_error", flat=True))
    assert [e.split(":")[0] for e in sorted(errors)] == ["PermanentHookError", "TransientHookError",
                                                          "TransientHookError"]
    for text in [caplog.text, *errors, *(record.getMessage() for record in caplog.records)]:
        assert "XXXXsecretXXXX" not in text and "/services/" not in text, text


def test_the_webhook_without_a_secret_is_a_configuration_error(settings: Any) -> None:
    settings.HOOK_WEBHOOK_SECRET = ""
    with pytest.raises(ImproperlyConfigured, match="HOOK_WEBHOOK_SECRET"):
        hooks.validate_configuration()
